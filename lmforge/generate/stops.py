"""Where a continuation ends in its text: before the first stop string, or at the end of its N-th line.

A model stops by itself at its end-of-text token; a user may want it to stop sooner, at a text
boundary that is not a token: a blank line (the stop string ``"\\n\\n"``), a speaker's name, or
after a number of lines (a quatrain is four). ``lmforge generate --stop/--max-lines`` and the
server's ``stop`` parameter use the functions below.

Stop strings are cut off (not part of the output, as in OpenAI's API); with ``max_lines`` the
output ends just before its N-th line break. While text streams out, the characters at its end
that may still become a stop string are held back (:func:`held_back`), so a stop string is never
shown in part.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.errors import LMForgeError


def check_stops(stops: Sequence[str], max_lines: int | None) -> list[str]:
    """The non-empty stop strings; a bad ``max_lines`` is refused."""
    if max_lines is not None and max_lines < 1:
        raise LMForgeError(f"max_lines must be at least 1, got {max_lines}; leave it unset to stop at the end of text")
    return [s for s in stops if s]


def find_stop(text: str, stops: Sequence[str], start: int = 0, max_lines: int | None = None) -> int | None:
    """Where ``text`` ends: the first stop string found from ``start`` on, or the ``max_lines``-th line
    break, whichever comes first; None when neither is there (yet)."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    if max_lines is not None and text.count("\n") >= max_lines:
        at = -1
        for _ in range(max_lines):
            at = text.index("\n", at + 1)
        found.append(at)
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str], sent: int) -> int:
    """How many characters at the end of ``text`` (past the ``sent`` already shown) may begin a stop string."""
    for k in range(min(len(text) - sent, max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class StopWatch:
    """One continuation's text as it streams in: ``push(piece)`` returns what may be shown now and sets
    ``done`` once the text has reached a stop string or its last line; ``flush()`` returns the rest."""

    def __init__(self, stops: Sequence[str] = (), max_lines: int | None = None):
        self.stops, self.max_lines = check_stops(stops, max_lines), max_lines
        self.text, self.sent, self.done = "", 0, False

    def push(self, piece: str) -> str:
        if self.done:
            return ""
        self.text += piece
        end = find_stop(self.text, self.stops, self.sent, self.max_lines)
        if end is not None:
            self.text, self.done = self.text[:end], True
            return self._take(end)
        return self._take(len(self.text) - held_back(self.text, self.stops, self.sent))

    def flush(self) -> str:
        """The characters held back: at the end of the text they did not become a stop string."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece
