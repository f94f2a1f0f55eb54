"""Stop strings on the text the worker makes from token ids (``instance.text``).

The engine stops generating at the token that completes a stop string, but
the worker's text is made from every token, so the stop string (and whatever
followed it in that token) would reach the client. As vLLM's own
detokenizer does, the text is cut where the first stop string starts (after
it, with ``include_stop_str_in_output``), and while the request runs the
last ``len(longest stop) - 1`` characters are held back, since they may be
the start of a stop string. The window's state (the held characters) moves
with a migrated request, so the destination emits exactly what the source
would have.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopWindow:
    stops: tuple[str, ...]
    include: bool = False
    """Keep the stop string in the output (vLLM's ``include_stop_str_in_output``)."""
    held: str = ""
    """Produced but not emitted: it may begin a stop string."""
    hit: str | None = None
    """The stop string the text ended at (then nothing more is emitted)."""

    @property
    def keep(self) -> int:
        """Characters held back while the request runs."""
        return max((len(s) for s in self.stops), default=1) - 1

    def push(self, text: str) -> str:
        """What of ``text`` (after what is held) may go to the client now."""
        if self.hit is not None:
            return ""
        buf = self.held + text
        # As vLLM checks after each step: the first stop string, in the
        # request's order, that the new text completes (one wholly in the
        # held text would have been found before).
        for stop in self.stops:
            at = buf.find(stop)
            if at >= 0:
                self.hit, self.held = stop, ""
                return buf[: at + (len(stop) if self.include else 0)]
        cut = max(0, len(buf) - self.keep)
        self.held = buf[cut:]
        return buf[:cut]

    def flush(self) -> str:
        """At the end of the output (no stop string in it): the held text."""
        held, self.held = self.held, ""
        return held
