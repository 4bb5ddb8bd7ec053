import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpe.tiny import tiny_tokenizer
from rpe.rollouts import make_steps
from rpe.segment import split_steps, token_char_ends, token_spans

TEXT = "Step 1: 2 + 3 = 5.\n\nStep 2: 5 - 1 = 4.\n \n\nAnswer: 4"


def _texts(text, spans):
    return [text[s.start : s.end] for s in spans]


def test_paragraph_newline_sentence_regex():
    assert _texts(TEXT, split_steps(TEXT)) == ["Step 1: 2 + 3 = 5.", "Step 2: 5 - 1 = 4.", "Answer: 4"]
    assert _texts("a\nb\n\nc", split_steps("a\nb\n\nc", "newline")) == ["a", "b", "c"]
    assert _texts("One. Two! Three?", split_steps("One. Two! Three?", "sentence")) == ["One.", "Two!", "Three?"]
    text = "x Step y Step z"
    assert _texts(text, split_steps(text, "regex", r"(?=Step)")) == ["x", "Step y", "Step z"]
    assert split_steps("   \n\n  ") == []


def test_bad_segmenter_options():
    with pytest.raises(ValueError, match="paragraph, newline, sentence, regex"):
        split_steps("a", "words")
    with pytest.raises(ValueError, match="needs a separator"):
        split_steps("a", "regex")
    with pytest.raises(ValueError, match="invalid step separator"):
        split_steps("a", "regex", "(")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .!?\n\t")), max_size=80), st.sampled_from(["paragraph", "newline", "sentence"]))
def test_segments_are_ordered_stripped_and_cover_all_content(text, method):
    spans = split_steps(text, method)
    previous_end = 0
    for s in spans:
        assert previous_end <= s.start < s.end <= len(text)
        piece = text[s.start : s.end]
        assert piece == piece.strip() and piece
        previous_end = s.end
    # every non-white character lies inside some step
    covered = set()
    for s in spans:
        covered.update(range(s.start, s.end))
    assert all(i in covered for i, c in enumerate(text) if not c.isspace())


def test_token_spans_point_at_the_step_tokens():
    tok = tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    steps = make_steps(tok, ids, TEXT, "paragraph", None)
    assert [s.text for s in steps] == ["Step 1: 2 + 3 = 5.", "Step 2: 5 - 1 = 4.", "Answer: 4"]
    for s in steps:
        assert tok.decode(ids[s.token_start : s.token_end]) == s.text
        assert tok.decode(ids[s.token_end - 1 : s.token_end]) == s.text[-1]


def test_token_spans_with_multi_character_tokens(real_tokenizer_or_tiny):
    tok = real_tokenizer_or_tiny
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    spans = split_steps(TEXT)
    for span, (a, b) in zip(spans, token_spans(spans, token_char_ends(tok, ids))):
        decoded = tok.decode(ids[a:b])
        assert TEXT[span.start : span.end] in decoded
        assert TEXT[span.start : span.end] not in tok.decode(ids[a : b - 1])


@pytest.fixture
def real_tokenizer_or_tiny():
    from rpe.models import DEFAULT_MODEL, is_fetched, model_dir

    if is_fetched(DEFAULT_MODEL):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir(DEFAULT_MODEL))
    return tiny_tokenizer()
