"""The instance's text is a function of the token sequence alone: carried
across a migration (its state) or rebuilt for a replay (from the output the
client has), it goes on with exactly the characters an uninterrupted stream
emits, raw UTF-8 bytes included; an incomplete character at the end is
dropped, as vLLM's detokenizer drops it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from instance.sim.codec import ByteTokenizer
from instance.text import TextStream

TOK = ByteTokenizer()
PROMPT = list(b"The prompt: ")
byte_tokens = st.lists(st.integers(0, 255), min_size=1, max_size=60)


def _whole(tokens: list[int], chunk: int = 1) -> str:
    stream = TextStream.start(TOK, PROMPT)
    parts = [stream.push(tokens[i : i + chunk]) for i in range(0, len(tokens), chunk)]
    return "".join(parts) + stream.flush()


def test_complete_characters_come_out_whole_and_incomplete_ones_wait() -> None:
    stream = TextStream.start(TOK, PROMPT)
    euro = list("€".encode())
    assert stream.push(euro[:2]) == ""  # two of its three bytes: nothing yet
    assert stream.push(euro[2:]) == "€"
    assert stream.push([0xFF]) == ""  # never valid: held ...
    assert stream.push([0x61]) == "\ufffda"  # ... until text follows it
    assert stream.push(euro[:1]) == ""
    assert stream.flush() == ""  # an incomplete character at the end: dropped


@settings(max_examples=200, deadline=None)
@given(tokens=byte_tokens, cut=st.integers(0, 60), chunk=st.integers(1, 5))
def test_a_stream_carried_across_a_migration_emits_the_same_text(
    tokens: list[int], cut: int, chunk: int
) -> None:
    cut = min(cut, len(tokens))
    source = TextStream.start(TOK, PROMPT)
    before = source.push(tokens[:cut])
    destination = TextStream.resumed(TOK, source.state)
    after = destination.push(tokens[cut:]) + destination.flush()
    assert before + after == _whole(tokens) == _whole(tokens, chunk)


@settings(max_examples=200, deadline=None)
@given(tokens=byte_tokens, cut=st.integers(0, 60))
def test_a_stream_rebuilt_for_a_replay_emits_the_same_text(tokens: list[int], cut: int) -> None:
    cut = min(cut, len(tokens))
    sent = TextStream.start(TOK, PROMPT).push(tokens[:cut])
    stream, text = TextStream.replayed(TOK, PROMPT, tokens[:cut])
    assert text == sent
    assert sent + stream.push(tokens[cut:]) + stream.flush() == _whole(tokens)
