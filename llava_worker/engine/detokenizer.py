"""Incremental detokenisation with stop strings: which generated text is safe to show so far."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

#: What a tokenizer decodes an incomplete multi-byte character to.
_REPLACEMENT_CHAR = "\ufffd"


class TextAccumulator:
    """Collects generated token ids and keeps the text a client may see.

    The visible text only ever grows: it holds back an incomplete UTF-8 character and any tail
    that could still become a stop string, and it ends just before the first stop string, so a stop
    string never reaches the client even when it ends inside a token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        # Decoding only a short window of recent tokens, with a little context before it, keeps
        # each step cheap while merging pieces (e.g. leading spaces) the same way a full decode does.
        self._prefix_offset = 0
        self._read_offset = 0
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
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(_REPLACEMENT_CHAR):
            return  # nothing printable yet (an unfinished character, or a token that adds no text)
        previous_length = len(self._text)
        self._text += window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._cut_at_stop(previous_length)

    def visible_text(self) -> str:
        """Text safe to send now: everything except a tail that may be the start of a stop string."""
        if self.stopped or not self._stop:
            return self._text
        hold = max((_overlap(self._text, stop) for stop in self._stop), default=0)
        return self._text[: len(self._text) - hold]

    def final_text(self) -> str:
        """The whole answer once generation is over.

        A full decode settles anything the windowed decode could not (an unfinished character at
        the very end); it is used only when it extends what was already shown, so text never shrinks.
        """
        if self.stopped:
            return self._text
        full = self._decode(self._ids)
        candidate = full if full.startswith(self._text) else self._text
        previous_length = len(self._text)
        self._text = candidate
        self._cut_at_stop(previous_length)
        return self._text

    def _cut_at_stop(self, previous_length: int) -> None:
        # A stop string can only be new if it ends in the text just added.
        longest = max((len(stop) for stop in self._stop), default=0)
        start = max(0, previous_length - longest + 1)
        hits = [index for stop in self._stop if (index := self._text.find(stop, start)) >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


def _overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0
