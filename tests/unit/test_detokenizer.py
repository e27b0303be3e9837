"""Streamed text token by token: SentencePiece's decode byte for byte, only settled text shown, stop strings cut."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llava_worker.engine.decoders import SentencePieceDecoder, TokenizerDecoder, decoder_for
from llava_worker.engine.detokenizer import TextAccumulator
from llava_worker.testing.tiny import build_tokenizer
from llava_worker.testing.tiny_original import IMAGE_PATCH_TOKEN, write_tokenizer

# A byte-fallback piece, written as its byte value, or text SentencePiece encodes to pieces.
Segment = int | str


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sentencepiece")
    write_tokenizer(directory, ["<image>"])  # tokenizer.model only, as liuhaotian's repos ship it
    return directory


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(sentencepiece_dir: Path) -> PreTrainedTokenizerBase:
    # Loaded and extended the way models/original/loader.py does it.
    loaded = AutoTokenizer.from_pretrained(sentencepiece_dir)
    loaded.add_tokens([IMAGE_PATCH_TOKEN], special_tokens=True)
    return loaded


@pytest.fixture(scope="module")
def processor(sentencepiece_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def byte_fallback_tokenizer(sentencepiece_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same vocabulary as a tokenizer.json only: transformers' own byte-fallback decoder."""
    directory = tmp_path_factory.mktemp("tokenizer-json")
    AutoTokenizer.from_pretrained(sentencepiece_dir).save_pretrained(directory)
    (directory / "tokenizer.model").unlink(missing_ok=True)
    return AutoTokenizer.from_pretrained(directory)


def _feed(accumulator: TextAccumulator, ids: list[int]) -> list[str]:
    seen = []
    for token in ids:
        accumulator.add([token])
        seen.append(accumulator.visible_text())
    return seen


def _ids(processor: spm.SentencePieceProcessor, segments: list[Segment]) -> list[int]:
    ids: list[int] = []
    for segment in segments:
        if isinstance(segment, int):
            ids.append(processor.piece_to_id(f"<0x{segment:02X}>"))
        else:
            ids.extend(processor.encode(segment))
    return ids


def _sentencepiece_reference(processor: spm.SentencePieceProcessor, tokenizer, ids: list[int]) -> str:
    """The original worker's text: SentencePiece's decode, special tokens skipped."""
    special = set(tokenizer.all_special_ids)
    return str(processor.decode([i for i in ids if i not in special]))


def _cut(text: str, stops: tuple[str, ...]) -> str:
    hits = [index for stop in stops if (index := text.find(stop)) >= 0]
    return text[: min(hits)] if hits else text


def _assert_streamed(seen: list[str], final: str, stops: tuple[str, ...] = ()) -> None:
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))
    assert all(final.startswith(shown) for shown in seen)
    assert not any(stop in shown for stop in stops for shown in seen)


def test_the_decoder_follows_the_tokenizer(sentencepiece_tokenizer, processor, tokenizer, byte_fallback_tokenizer):
    assert len(_byte_ids(processor)) == 256
    assert isinstance(decoder_for(sentencepiece_tokenizer), SentencePieceDecoder)
    assert isinstance(decoder_for(tokenizer), TokenizerDecoder)
    assert isinstance(decoder_for(byte_fallback_tokenizer), TokenizerDecoder)
    assert decoder_for(tokenizer) is decoder_for(tokenizer)


_BYTE_RUNS: list[list[Segment]] = [
    ["price", 0xE2, 0x82],  # cut off inside a character
    [0xE2, "a"],  # a lead byte, then a word
    ["ok", 0xFF],
    ["cost", 0xE2, 0x82, 0xAC, "ok"],  # a whole character
    ["café", 0xC3, 0xA9, 0xFF, "at"],  # a valid character, then an invalid byte in the same run
    [0xF0, 0x9F, 0x98, 0x80, 0xF0, 0x9F],  # an emoji, then half of one
    [0x20, "a"],  # a space byte first: SentencePiece strips only a piece's ▁
    [0x0A, 0xE2, 0x0A, "sat"],  # newlines around a stray lead byte
    [0xC3, 0xA9, 0xC3, 0x28, 0xED, 0xA0, 0x80],  # é, a bad continuation, a surrogate
]


def test_byte_runs_stream_as_sentencepiece_decodes_them(sentencepiece_tokenizer, processor):
    for segments in _BYTE_RUNS:
        ids = _ids(processor, segments)
        accumulator = TextAccumulator(sentencepiece_tokenizer)
        seen = _feed(accumulator, ids)
        final = accumulator.final_text()
        assert final == _sentencepiece_reference(processor, sentencepiece_tokenizer, ids), segments
        _assert_streamed(seen, final)
    # An unfinished character is held back until it is whole.
    accumulator = TextAccumulator(sentencepiece_tokenizer)
    assert _feed(accumulator, _ids(processor, ["cost", 0xE2, 0x82, 0xAC]))[-3:] == ["cost", "cost", "cost€"]


def test_special_tokens_are_skipped_and_added_tokens_shown(sentencepiece_tokenizer, processor):
    tokenizer = sentencepiece_tokenizer
    image, patch = tokenizer.convert_tokens_to_ids(["<image>", IMAGE_PATCH_TOKEN])
    words = _ids(processor, ["the cat"])
    ids = [tokenizer.bos_token_id, *words, patch, tokenizer.unk_token_id, image, *words, tokenizer.eos_token_id]
    assert decoder_for(tokenizer).decode(ids) == "the cat<image> the cat"
    assert decoder_for(tokenizer).decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    # Inside a byte run a skipped token leaves the run whole, as skip_special_tokens did.
    run = [*_ids(processor, [0xC3]), tokenizer.bos_token_id, *_ids(processor, [0xA9])]
    assert decoder_for(tokenizer).decode(run) == "é"


def test_stop_strings_cut_sentencepiece_text(sentencepiece_tokenizer, processor):
    ids = _ids(processor, ["cost", 0xE2, 0x82, 0xAC, "ok", 0xC3, 0xA9, 0xFF, "at", 0xE2, "a", 0xE2, 0x82])
    reference = _sentencepiece_reference(processor, sentencepiece_tokenizer, ids)
    # In the text, in a byte run's replacement, and only in the end that the final decode settles.
    for stop in ["€", "é\ufffd", "\ufffd a", "\ufffd\ufffd"]:
        assert stop in reference
        accumulator = TextAccumulator(sentencepiece_tokenizer, (stop, "never-there"))
        seen = _feed(accumulator, ids)
        final = accumulator.final_text()
        assert accumulator.stopped
        assert final == reference[: reference.find(stop)], stop
        _assert_streamed(seen, final, (stop,))


def _byte_ids(processor: spm.SentencePieceProcessor) -> list[int]:
    return [i for i in range(processor.get_piece_size()) if processor.is_byte(i)]


def _random_ids(rng: random.Random, tokenizer, byte_ids: list[int], vocabulary: int) -> list[int]:
    # Mostly byte pieces, so that valid, truncated and invalid byte runs all come up.
    special = tokenizer.all_special_ids
    draws = (rng.random() for _ in range(rng.randrange(25)))
    return [
        rng.choice(byte_ids) if r < 0.5 else rng.choice(special) if r < 0.55 else rng.randrange(vocabulary)
        for r in draws
    ]


def _random_stops(rng: random.Random, text: str) -> tuple[str, ...]:
    stops = []
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        start = rng.randrange(len(text) + 1)
        stops.append(text[start : start + rng.randint(1, 3)] or "never-there")
    return tuple(stops)


def _check_stream(tokenizer, ids: list[int], stops: tuple[str, ...]) -> None:
    accumulator = TextAccumulator(tokenizer, stops)
    seen = _feed(accumulator, ids)
    streamed_to_the_end = not accumulator.stopped
    final = accumulator.final_text()
    taken = accumulator.token_ids
    assert taken == ids[: len(taken)]
    if streamed_to_the_end:
        assert taken == ids
    full = decoder_for(tokenizer).decode(taken)
    _assert_streamed(seen, final, stops)
    assert full.startswith(final)
    assert not any(stop in final for stop in stops)
    # With one stop string, or none seen while streaming, the cut is at the first one in the full text;
    # two stop strings that overlap are cut where the stream met one first.
    if len(stops) < 2 or streamed_to_the_end:
        assert final == _cut(full, stops)
    else:
        assert any(full[len(final) :].startswith(stop) for stop in stops)


def test_random_tokens_stream_the_full_decode(sentencepiece_tokenizer, processor, tokenizer, byte_fallback_tokenizer):
    sentencepiece_vocabulary = processor.get_piece_size()  # not <image>: SentencePiece cannot decode it
    cases = [
        # Byte-level BPE's first pieces after its specials are the 256 single bytes.
        (tokenizer, list(range(5, 261)), len(tokenizer)),
        (sentencepiece_tokenizer, _byte_ids(processor), sentencepiece_vocabulary),
        (byte_fallback_tokenizer, _byte_ids(processor), len(byte_fallback_tokenizer)),
    ]
    rng = random.Random(1234)
    for chosen, byte_ids, vocabulary in cases:
        for _ in range(300):
            ids = _random_ids(rng, chosen, byte_ids, vocabulary)
            full = decoder_for(chosen).decode(ids)
            if chosen is sentencepiece_tokenizer:
                assert full == _sentencepiece_reference(processor, chosen, ids), ids
            else:
                assert full == chosen.decode(ids, skip_special_tokens=True)
            _check_stream(chosen, ids, ())
            _check_stream(chosen, ids, _random_stops(rng, full))


def test_many_random_sentencepiece_sequences_decode_as_sentencepiece(sentencepiece_tokenizer, processor):
    decoder = decoder_for(sentencepiece_tokenizer)
    rng = random.Random(99)
    byte_ids = _byte_ids(processor)
    for _ in range(3000):
        ids = _random_ids(rng, sentencepiece_tokenizer, byte_ids, processor.get_piece_size())
        stream = decoder.stream()
        streamed = "".join(stream.push(i) for i in ids)
        reference = _sentencepiece_reference(processor, sentencepiece_tokenizer, ids)
        assert decoder.decode(ids) == reference, ids
        assert reference.startswith(streamed)


# The byte-level BPE tokenizer's behaviour, as before.


def test_accumulated_text_equals_a_full_decode(tokenizer):
    ids = tokenizer("The little boat sails across the sea at night.", add_special_tokens=False)["input_ids"]
    accumulator = TextAccumulator(tokenizer)
    seen = _feed(accumulator, ids)
    assert accumulator.final_text() == tokenizer.decode(ids)
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))


def test_incomplete_utf8_is_held_back(tokenizer):
    ids = tokenizer("café ☕ ok", add_special_tokens=False)["input_ids"]
    accumulator = TextAccumulator(tokenizer)
    seen = _feed(accumulator, ids)
    assert all("\ufffd" not in text for text in seen)
    assert accumulator.final_text() == "café ☕ ok"


@pytest.mark.parametrize("stop", ["sea", "oat sa", "t.", "boat sails across"])
def test_stop_string_is_cut_and_never_shown(tokenizer, stop):
    text = "The little boat sails across the sea at night. More after."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    accumulator = TextAccumulator(tokenizer, (stop, "never-there"))
    seen = _feed(accumulator, ids)
    assert accumulator.stopped
    assert accumulator.final_text() == text[: text.find(stop)]
    assert all(stop not in shown for shown in seen)
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))


def test_a_partial_stop_string_is_released_when_it_does_not_complete(tokenizer):
    accumulator = TextAccumulator(tokenizer, ("sea monster",))
    _feed(accumulator, tokenizer("across the sea at", add_special_tokens=False)["input_ids"])
    assert not accumulator.stopped
    assert accumulator.final_text() == "across the sea at"
