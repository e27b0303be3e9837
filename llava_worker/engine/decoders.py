"""Token ids to text: SentencePiece's own decode for SentencePiece checkpoints, the tokenizer's otherwise."""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2
from transformers import PreTrainedTokenizerBase

__all__ = ["REPLACEMENT_CHAR", "SentencePieceDecoder", "TextDecoder", "TextStream", "TokenizerDecoder", "decoder_for"]

#: What an invalid or unfinished UTF-8 sequence decodes to.
REPLACEMENT_CHAR = "\ufffd"
#: SentencePiece's whitespace symbol (U+2581), which decodes to a space.
_SPACE = "\u2581"
_BYTE_PIECES = tuple(f"<0x{value:02X}>" for value in range(256))
_PIECE_TYPE = sentencepiece_model_pb2.ModelProto.SentencePiece  # type: ignore[attr-defined]


def _replace_one_byte(error: UnicodeError) -> tuple[str, int]:
    # SentencePiece replaces each byte that starts no valid character and goes on with the next byte,
    # where Python's "replace" gives one U+FFFD for a whole truncated sequence ("\xe2\x82" -> 1, not 2).
    assert isinstance(error, UnicodeDecodeError)
    return REPLACEMENT_CHAR, error.start + 1


_SENTENCEPIECE_ERRORS = "llava_worker.sentencepiece_replace"
codecs.register_error(_SENTENCEPIECE_ERRORS, _replace_one_byte)


class TextStream(Protocol):
    """Decodes tokens one at a time."""

    def push(self, token_id: int) -> str:
        """Takes the next token and returns the text it settles: text that a full decode of these
        tokens, and of any tokens that follow them, has at this position."""
        ...


class TextDecoder(Protocol):
    """How one tokenizer's ids become text, whole or token by token."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of `token_ids`; what the streamed text of the same tokens ends up as."""
        ...

    def stream(self) -> TextStream:
        """A fresh stream whose settled text is always a prefix of `decode` of the tokens pushed."""
        ...


#: One id as SentencePiece decodes it: a byte of a byte-fallback run, a piece's text (with its ▁
#: whitespace symbols), or None for an id that shows nothing (a special token, skipped as
#: ``skip_special_tokens=True`` does).
_Piece = int | str | None


@dataclass(frozen=True)
class SentencePieceDecoder:
    """``SentencePieceProcessor.decode`` over a tokenizer's ids, its special tokens skipped.

    This is the decode the original worker's slow LlamaTokenizer used: runs of byte-fallback pieces
    become UTF-8 with one U+FFFD per byte that starts no valid character, and the dummy-prefix space
    is stripped from the first piece only. transformers 5's tokenizers instead turn a whole byte run
    into U+FFFDs when any byte in it is invalid, and strip a leading space whatever piece it came from.
    """

    pieces: tuple[_Piece, ...]
    #: SentencePiece consumes a leading ▁ at the start of the text (add_dummy_prefix or
    #: remove_extra_whitespaces in the model's normalizer spec) ...
    strip_leading_space: bool
    #: ... and, with remove_extra_whitespaces, one from every piece until some text appears.
    strip_every_leading_space: bool

    def decode(self, token_ids: Sequence[int]) -> str:
        stream = self.stream()
        text = "".join(stream.push(token_id) for token_id in token_ids)
        return text + stream.finish()

    def stream(self) -> SentencePieceStream:
        return SentencePieceStream(self)

    def piece(self, token_id: int) -> _Piece:
        # Ids past the vocabulary (a model's padded output rows) show nothing, as in the tokenizer's decode.
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None


class SentencePieceStream:
    """SentencePiece's decode loop (``SentencePieceProcessor::Decode``) run one piece at a time.

    Each piece's text is final when it is pushed, except the end of a byte run that may still become
    a character: that is held back until the run goes on or ends (`finish`).
    """

    def __init__(self, decoder: SentencePieceDecoder) -> None:
        self._decoder = decoder
        self._run = bytearray()  # the undecided end of the current run of byte pieces
        # SentencePiece's own state, under its names: is_bos_ws, bos_ws_seen and !text.empty().
        self._is_bos_ws = True
        self._bos_ws_seen = False
        self._has_text = False

    def push(self, token_id: int) -> str:
        piece = self._decoder.piece(token_id)
        if piece is None:
            return ""  # as if never generated: a byte run goes on across it
        if isinstance(piece, int):
            self._run.append(piece)
            return self._decode_run(final=False)
        return self._decode_run(final=True) + self._surface(piece)

    def finish(self) -> str:
        """The held-back end of a byte run, decoded as it stands (no more tokens come)."""
        return self._decode_run(final=True)

    def _decode_run(self, *, final: bool) -> str:
        # Not final, the UTF-8 decoder keeps back only a tail that more bytes could still make valid.
        text, used = codecs.utf_8_decode(bytes(self._run), _SENTENCEPIECE_ERRORS, final)
        del self._run[:used]
        self._has_text = self._has_text or bool(text)
        return text

    def _surface(self, piece: str) -> str:
        if self._bos_ws_seen or self._has_text:
            self._is_bos_ws = False
        self._bos_ws_seen = False
        if self._is_bos_ws and self._decoder.strip_leading_space and piece.startswith(_SPACE):
            piece = piece[1:]
            self._bos_ws_seen = not self._decoder.strip_every_leading_space
        text = piece.replace(_SPACE, " ")
        self._has_text = self._has_text or bool(text)
        return text


class TokenizerDecoder:
    """The tokenizer's own ``decode(..., skip_special_tokens=True)``, for tokenizers that are not
    SentencePiece models (byte-level BPE such as Qwen2's or Llama 3's)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        vocabulary: dict[str, int] = tokenizer.get_vocab()
        self._byte_piece_ids = frozenset(vocabulary[piece] for piece in _BYTE_PIECES if piece in vocabulary)
        self._skipped_ids = _special_ids(tokenizer)
        self._size = len(tokenizer)

    def decode(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def stream(self) -> WindowStream:
        return WindowStream(self)

    def in_byte_run(self, token_id: int, *, before: bool) -> bool:
        """Whether a run of byte-fallback pieces is open after `token_id` (`before`: whether it was
        before it). transformers' ByteFallback decoder turns a whole run into U+FFFDs when any byte
        in it is invalid, so the text of an open run may still change."""
        if token_id in self._byte_piece_ids:
            return True
        # A token that shows nothing (a special one, an id past the vocabulary) leaves the run open.
        shows_nothing = token_id in self._skipped_ids or not 0 <= token_id < self._size
        return before and shows_nothing


class WindowStream:
    """Decodes only a short window of recent tokens, so each step is cheap.

    The window starts at the tokens that settled last, which make pieces merge (a leading space, a
    character split over tokens) as in a full decode. The window's new text settles once it ends on
    a whole character, outside a byte-fallback run: for byte-level BPE (bytes joined, then decoded
    as UTF-8) and transformers' SentencePiece-style decoders, a full decode's text up to such a point
    never changes, and from it on equals the window's.
    """

    def __init__(self, decoder: TokenizerDecoder) -> None:
        self._decoder = decoder
        self._window: list[int] = []
        self._context = 0  # how many tokens at the window's start have settled already
        self._in_byte_run = False

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        self._in_byte_run = self._decoder.in_byte_run(token_id, before=self._in_byte_run)
        context = self._decoder.decode(self._window[: self._context])
        text = self._decoder.decode(self._window)
        if not self._settles(context, text):
            return ""
        del self._window[: self._context]
        self._context = len(self._window)
        return text[len(context) :]

    def _settles(self, context: str, text: str) -> bool:
        return (
            len(text) > len(context)
            # A decoder whose output for the context depends on what follows is never cut mid-way.
            and text.startswith(context)
            and not text.endswith(REPLACEMENT_CHAR)
            and not self._in_byte_run
        )


_DECODERS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, TextDecoder]] = weakref.WeakKeyDictionary()


def decoder_for(tokenizer: PreTrainedTokenizerBase) -> TextDecoder:
    """The decoder for `tokenizer`, built once (again only if tokens were added since)."""
    cached = _DECODERS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    decoder: TextDecoder | None = sentencepiece_decoder(tokenizer)
    if decoder is None:
        decoder = TokenizerDecoder(tokenizer)
    _DECODERS[tokenizer] = (len(tokenizer), decoder)
    return decoder


def sentencepiece_decoder(tokenizer: PreTrainedTokenizerBase) -> SentencePieceDecoder | None:
    """SentencePiece decoding for a tokenizer built from a SentencePiece model, else None.

    The model file (``tokenizer.model``, the tokenizer's ``vocab_file``) is what tells piece types
    (byte, control, unknown) and the whitespace rules exactly; transformers' own decoder does not
    carry them. It is used only when its pieces are the tokenizer's first ids, and never with a
    denormalizer, which rewrites text across pieces.
    """
    model = _sentencepiece_model(tokenizer)
    if model is None or model.denormalizer_spec.precompiled_charsmap:
        return None
    size = len(model.pieces)
    if tokenizer.convert_ids_to_tokens(list(range(size))) != [p.piece for p in model.pieces]:
        return None
    skipped = _special_ids(tokenizer)
    own = [_model_piece(p, model.trainer_spec.unk_surface) for p in model.pieces]
    added = tokenizer.convert_ids_to_tokens(list(range(size, len(tokenizer))))
    pieces = [None if i in skipped else piece for i, piece in enumerate([*own, *added])]
    spec = model.normalizer_spec
    return SentencePieceDecoder(
        pieces=tuple(pieces),
        strip_leading_space=spec.add_dummy_prefix or spec.remove_extra_whitespaces,
        strip_every_leading_space=spec.remove_extra_whitespaces,
    )


def _sentencepiece_model(tokenizer: PreTrainedTokenizerBase) -> Any:
    path = getattr(tokenizer, "vocab_file", None)
    if not isinstance(path, str) or not path.endswith(".model") or not Path(path).is_file():
        return None
    try:
        return sentencepiece_model_pb2.ModelProto.FromString(Path(path).read_bytes())  # type: ignore[attr-defined]
    except DecodeError:
        return None


def _model_piece(piece: Any, unk_surface: str) -> _Piece:
    if piece.type == _PIECE_TYPE.BYTE:
        return int(piece.piece[3:5], 16)  # "<0xE2>"
    if piece.type == _PIECE_TYPE.CONTROL:
        return ""  # <s>, </s>: invisible, yet they end a byte run
    if piece.type == _PIECE_TYPE.UNKNOWN:
        return unk_surface  # " ⁇ ", shown as is
    return str(piece.piece)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids ``decode(..., skip_special_tokens=True)`` drops: named special tokens and special added ones."""
    added = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(added | set(tokenizer.all_special_ids))
