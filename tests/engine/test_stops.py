"""StopMatcher against the obvious search, on random stop lists and texts fed in random pieces."""

from __future__ import annotations

import random

from llava_worker.engine.stops import StopMatcher


def naive(text: str, stops: list[str]) -> tuple[int | None, int]:
    """Where the earliest stop string in `text` begins, and the longest end of `text` that begins one."""
    hits = [index for stop in stops if (index := text.find(stop)) >= 0]
    pending = max(
        (n for stop in stops for n in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:n])), default=0
    )
    return (min(hits) if hits else None), pending


def test_the_matcher_finds_what_a_plain_search_finds_piece_by_piece() -> None:
    generator = random.Random(7)
    for _ in range(3000):
        stops = ["".join(generator.choices("abc", k=generator.randint(1, 5))) for _ in range(generator.randint(1, 6))]
        text = "".join(generator.choices("abcd", k=generator.randint(0, 30)))
        matcher = StopMatcher(tuple(stops))
        fed = ""
        while fed != text:
            piece = text[len(fed) : len(fed) + generator.randint(1, 4)]
            found = matcher.feed(piece)
            fed += piece
            expected, pending = naive(fed, stops)
            assert found == expected, (stops, fed)
            if found is not None:
                break
            assert matcher.pending == pending, (stops, fed)


def test_a_long_list_of_long_stops_is_matched_across_pieces() -> None:
    # Building is linear in the stops' total size; feeding a character is one transition (plus
    # failure links), whatever the number of stops.
    stops = tuple(f"{index:05d}" + "x" * 195 for index in range(1_000))
    matcher = StopMatcher(stops)
    assert matcher.feed("y" * 100_000) is None
    assert matcher.feed("00042" + "x" * 100) is None
    assert matcher.pending == 105
    assert matcher.feed("x" * 95 + "tail") == 100_000
