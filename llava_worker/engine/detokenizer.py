"""Incremental detokenisation with stop strings: which generated text is safe to show so far."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from llava_worker.engine.decoders import decoder_for


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
        previous_length = len(self._text)
        for token_id in token_ids:
            self._ids.append(token_id)
            self._text += self._stream.push(token_id)
        self._cut_at_stop(previous_length)

    def visible_text(self) -> str:
        """Text safe to send now: everything except a tail that may be the start of a stop string."""
        if self.stopped or not self._stop:
            return self._text
        hold = max((_overlap(self._text, stop) for stop in self._stop), default=0)
        return self._text[: len(self._text) - hold]

    def final_text(self) -> str:
        """The whole answer once generation is over: a full decode of every generated token, cut at
        the first stop string. It extends what was shown, since only settled text was shown; after
        a stop string it is the text before it, which is all settled already."""
        if not self.stopped:
            self._text = self._decoder.decode(self._ids)
            self._cut_at_stop(0)
        return self._text

    def _cut_at_stop(self, previous_length: int) -> None:
        # A stop string can only be new if it ends in the text just added.
        longest = max((len(stop) for stop in self._stop), default=0)
        start = max(0, previous_length - longest + 1)
        hits = [index for stop in self._stop if (index := self._text.find(stop, start)) >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True


def _overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0
