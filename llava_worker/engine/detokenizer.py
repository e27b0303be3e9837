"""Incremental detokenisation with stop strings: which generated text is safe to show so far."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from llava_worker.engine.decoders import decoder_for
from llava_worker.engine.stops import StopMatcher


class TextAccumulator:
    """Collects generated token ids and keeps the text a client may see.

    The visible text only ever grows and is always a prefix of the final text: it holds only text
    the decoder has settled (an unfinished character waits for the tokens that finish it), holds
    back any tail that could still become a stop string, and ends just before the first stop string,
    so a stop string never reaches the client even when it ends inside a token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._decoder = decoder_for(tokenizer)
        self._stream = self._decoder.stream()
        self._stop = tuple(s for s in stop if s)
        self._matcher = StopMatcher(self._stop) if self._stop else None
        self._ids: list[int] = []
        self._text = ""
        self.stopped = False
        """True once a stop string has appeared; no more tokens are taken after that."""

    @property
    def token_ids(self) -> list[int]:
        """Every token generated so far (the list itself: read it, do not change it)."""
        return self._ids

    def add(self, token_ids: list[int]) -> None:
        """Appends newly generated tokens; ignored once a stop string was hit."""
        if self.stopped:
            return
        added = ""
        for token_id in token_ids:
            self._ids.append(token_id)
            added += self._stream.push(token_id)
        self._text += added
        if self._matcher is not None:
            self._cut_at(self._matcher.feed(added))

    def visible_text(self) -> str:
        """Text safe to send now: everything except a tail that may be the start of a stop string."""
        if self.stopped or self._matcher is None:
            return self._text
        return self._text[: len(self._text) - self._matcher.pending]

    def final_text(self) -> str:
        """The whole answer once generation is over: a full decode of every generated token, cut at
        the first stop string. It extends what was shown, since only settled text was shown; after
        a stop string it is the text before it, which is all settled already."""
        if not self.stopped:
            self._text = self._decoder.decode(self._ids)
            if self._stop:
                self._cut_at(StopMatcher(self._stop).feed(self._text))
        return self._text

    def _cut_at(self, stop_start: int | None) -> None:
        if stop_start is not None:
            self._text = self._text[:stop_start]
            self.stopped = True
