"""StopMatcher: finds stop strings in generated text in time independent of how many there are.

An Aho-Corasick automaton over the stop strings: each character of text moves it by one transition
(amortised), and its state is the longest end of the text that begins some stop string, which is
exactly the tail that must be held back from the client until the next tokens decide it.
"""

from __future__ import annotations

from collections import deque


class StopMatcher:
    """Feeds on text one piece at a time and reports where the first stop string begins."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._fail = [0]
        self._is_stop = [False]
        """Whether a stop string ends exactly at this state."""
        self._longest_stop = [0]
        """Length of the longest stop string that ends the text at this state (0: none)."""
        for stop in stops:
            if stop:
                self._insert(stop)
        self._link()
        self._state = 0
        self._fed = 0

    @property
    def pending(self) -> int:
        """Length of the longest end of the text fed so far that begins a stop string."""
        return self._depth[self._state]

    def feed(self, text: str) -> int | None:
        """Consumes `text`. Returns the position (in all the text fed so far) where the earliest
        stop string completed within `text` begins, or None when none completed."""
        state, first = self._state, None
        for index, char in enumerate(text):
            while state and char not in self._goto[state]:
                state = self._fail[state]
            state = self._goto[state].get(char, 0)
            if self._longest_stop[state]:
                start = self._fed + index + 1 - self._longest_stop[state]
                first = start if first is None else min(first, start)
        self._state = state
        self._fed += len(text)
        return first

    def _insert(self, stop: str) -> None:
        state = 0
        for char in stop:
            following = self._goto[state].get(char)
            if following is None:
                following = len(self._goto)
                self._goto[state][char] = following
                self._goto.append({})
                self._depth.append(self._depth[state] + 1)
                self._fail.append(0)
                self._is_stop.append(False)
                self._longest_stop.append(0)
            state = following
        self._is_stop[state] = True

    def _link(self) -> None:
        """Failure links, breadth first, and for each state the longest stop string ending there."""
        queue: deque[int] = deque()
        for state in self._goto[0].values():
            self._longest_stop[state] = self._depth[state] if self._is_stop[state] else 0
            queue.append(state)
        while queue:
            state = queue.popleft()
            for char, following in self._goto[state].items():
                fallback = self._fail[state]
                while fallback and char not in self._goto[fallback]:
                    fallback = self._fail[fallback]
                self._fail[following] = self._goto[fallback].get(char, 0)
                inherited = self._longest_stop[self._fail[following]]
                self._longest_stop[following] = self._depth[following] if self._is_stop[following] else inherited
                queue.append(following)
