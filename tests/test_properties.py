"""Property-based tests (hypothesis) for answer extraction and the step segmenter's spans."""

from hypothesis import given, settings
from hypothesis import strategies as st

from rpe.segment import split_steps
from rpe.answers import extract_answer, verify

numbers = st.integers(min_value=-10**6, max_value=10**6)
prose = st.text(alphabet=st.sampled_from(list("abcdefgh +-=.\n")), max_size=60)


@settings(max_examples=200, deadline=None)
@given(prose, numbers, st.sampled_from(["Answer: {}", "#### {}", "\\boxed{{{}}}", "The answer is {}."]))
def test_a_stated_final_answer_is_extracted_and_verified(before, n, template):
    text = before + "\n" + template.format(n)
    assert extract_answer(text) == str(n)
    assert verify(extract_answer(text), str(n), "numeric") == 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_extraction_never_raises_and_returns_stripped_text(text):
    out = extract_answer(text)
    assert out is None or (out == out.strip() and out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab1+= .")), min_size=1, max_size=12), min_size=1, max_size=6))
def test_paragraph_steps_recover_the_written_paragraphs(paragraphs):
    paragraphs = [p.strip() for p in paragraphs if p.strip()]
    text = "\n\n".join(paragraphs)
    assert [text[s.start : s.end] for s in split_steps(text)] == paragraphs
