"""Stop strings over the worker's text: cut where vLLM cuts, however the text
arrives in pieces, and across a move (the held text travels)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from instance.stops import StopWindow


def _reference(pieces: list[str], stops: tuple[str, ...], include: bool) -> str:
    """vLLM's result: after each step, the first stop string (in the
    request's order) the text so far contains ends it there (or after it)."""
    text = ""
    for piece in pieces:
        text += piece
        for stop in stops:
            at = text.find(stop)
            if at >= 0:
                return text[: at + (len(stop) if include else 0)]
    return text


def _run(window: StopWindow, pieces: list[str]) -> str:
    out = "".join(window.push(p) for p in pieces)
    return out if window.hit is not None else out + window.flush()


alphabet = st.sampled_from("ab\n.")
pieces_of_text = st.lists(st.text(alphabet, max_size=4), max_size=12)
stop_strings = st.lists(st.text(alphabet, min_size=1, max_size=3), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(pieces=pieces_of_text, stops=stop_strings, include=st.booleans(), cut=st.integers(0, 12))
def test_the_text_is_cut_as_vllm_cuts_it_however_it_arrives_and_moves(
    pieces: list[str], stops: list[str], include: bool, cut: int
) -> None:
    expected = _reference(pieces, tuple(stops), include)
    assert _run(StopWindow(tuple(stops), include), pieces) == expected
    # A migration after ``cut`` pieces: the destination starts from the held text.
    source = StopWindow(tuple(stops), include)
    sent = "".join(source.push(p) for p in pieces[:cut])
    if source.hit is not None:
        assert sent == expected
        return
    destination = StopWindow(tuple(stops), include, held=source.held)
    assert sent + _run(destination, pieces[cut:]) == expected


def test_held_text_is_at_most_the_longest_stop_but_one() -> None:
    window = StopWindow(("STOP", "\n\n"))
    assert window.push("hello ST") == "hello"
    assert window.held == " ST" and window.keep == 3
    assert window.push("OP and more") == " " and window.hit == "STOP"
    assert window.push("ignored") == ""


def test_no_stop_strings_hold_nothing() -> None:
    window = StopWindow(())
    assert window.push("abc") == "abc" and window.held == "" and window.flush() == ""
