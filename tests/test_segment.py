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


def test_linear_token_char_ends_equal_full_decodes_of_every_prefix():
    """The O(n) windowed decode gives what one full decode per prefix gives, on byte-level BPE with multi-byte
    characters split over tokens (SmolLM2's tokenizer where fetched) and on the char tokenizer; a tokenizer the
    window misreads falls back to the exact method."""
    import random

    from rpe.models import DEFAULT_MODEL, is_fetched, model_dir
    from rpe.segment import token_char_ends_exact

    tokenizers = [tiny_tokenizer()]
    if is_fetched(DEFAULT_MODEL):
        from transformers import AutoTokenizer

        tokenizers.append(AutoTokenizer.from_pretrained(model_dir(DEFAULT_MODEL)))
    rng = random.Random(0)
    text = "Step 1: 3 + 4 = 7.\nÉtape 2: 7 × 2 = 14 🙂 数学 ok.\n" * 6
    for tok in tokenizers:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert token_char_ends(tok, ids, check_every=1000) == token_char_ends_exact(tok, ids)
        noise = [rng.randrange(len(tok)) for _ in range(150)]  # arbitrary ids, partial UTF-8 sequences included
        assert token_char_ends(tok, noise) == token_char_ends_exact(tok, noise)

    class Drifting:  # renders a token differently inside a short window than in the whole text
        def decode(self, ids, skip_special_tokens=False):
            return "".join("ab" if k == 0 and len(ids) < 10 else "a" for k, _ in enumerate(ids))

    assert token_char_ends(Drifting(), list(range(30))) == token_char_ends_exact(Drifting(), list(range(30)))
