"""Build deterministic tiny random-weight LLaVA and Llama checkpoints that load like real ones."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
)
from transformers.utils import logging as hf_logging
from transformers.utils.import_utils import is_torchvision_available

__all__ = [
    "BENCH_IMAGE_SIZE",
    "BENCH_IMAGE_TOKENS",
    "BENCH_MAX_POSITIONS",
    "BENCH_PATCH_SIZE",
    "CHECKPOINT_DIRS",
    "DEFAULT_SEED",
    "GRID_PINPOINTS",
    "IMAGE_SIZE",
    "IMAGE_TOKEN",
    "IMAGE_TOKENS_PER_IMAGE",
    "MARKER_FILE",
    "PATCH_SIZE",
    "benchmark_llava15_config",
    "build_all",
    "build_atomically",
    "build_benchmark_llama",
    "build_benchmark_llava15",
    "build_each_atomically",
    "build_internvl",
    "build_llava15",
    "build_llava_next",
    "build_sliding_window",
    "build_text_only",
    "build_tokenizer",
    "chat_template",
    "finish_model",
    "language_fields",
    "make_test_image",
    "save_quietly",
    "training_corpus",
]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"

VOCAB_SIZE = 512
IMAGE_SIZE = 32
PATCH_SIZE = 8
# (32 / 8) ** 2 patches; the CLS embedding is dropped by the "default" feature strategy.
IMAGE_TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
_RESIZE = {"shortest_edge": IMAGE_SIZE}
_CROP = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
# Large enough that greedy output depends on the image and the prompt; 0.02 gives one fixed answer.
INITIALIZER_RANGE = 0.2
MAX_POSITIONS = 512
DEFAULT_SEED = 0

CHECKPOINT_DIRS = {
    "llava-1.5": "tiny-llava-1.5",
    "llava-next": "tiny-llava-next",
    "text-only": "tiny-text-only",
    "sliding-window": "tiny-sliding-window",
    "internvl": "tiny-internvl",
}
MARKER_FILE = "TINY_CHECKPOINT_COMPLETE"
# Bump whenever the built checkpoints change, so caches built by older code are rebuilt.
BUILD_VERSION = "1"

# Word classes and sentence patterns keep the corpus English-shaped, so BPE learns word-like merges.
_WORD_CLASSES = {
    "det": "the a this that one two three some every no",
    "adj": "red green blue black white small large round square bright dark old new tiny big",
    "noun": "cat dog bird fish tree house car boat road river sky cloud sun moon star picture photo "
    "image person man woman child table chair cup book street city field flower water light",
    "verb": "is sits stands runs looks holds shows has sees follows crosses watches",
    "prep": "near under over next to with in on behind above below beside",
    "wh": "what where which who how why",
}
_PATTERNS = (
    "det adj noun verb prep det noun",
    "det noun verb prep det adj noun",
    "wh verb det adj noun",
    "wh verb det noun prep det noun",
    "det noun verb det adj adj noun",
    "det adj noun prep det noun verb",
)
_PUNCTUATION = (".", ".", ".", "?", "!", ",")


def training_corpus(seed: int, sentences: int = 3000) -> list[str]:
    """English-shaped sentences (some in the LLaVA chat format) to train the tiny tokenizers on."""
    # Seeded, so the vocabulary (and with it every checkpoint) is identical on every machine.
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORD_CLASSES[kind].split()) for kind in rng.choice(_PATTERNS).split()]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99)))
        sentence = " ".join(words).capitalize() + rng.choice(_PUNCTUATION)
        # The chat template's role markers should tokenize compactly like a real vocabulary.
        if rng.random() < 0.3:
            sentence = f"USER: {sentence} ASSISTANT: {sentence.lower()}"
        lines.append(sentence)
    return lines


def chat_template(with_images: bool) -> str:
    """Return a LLaVA-1.5 (Vicuna v1) chat template: ``USER: <image>\\n... ASSISTANT:``.

    Message content may be a string or a list of OpenAI-style parts. With ``with_images``
    every ``image``/``image_url`` part renders as ``<image>\\n`` (the processor expands it);
    otherwise image parts are dropped. BOS is not emitted: tokenizing adds it.
    """
    image_part = "{{- '" + IMAGE_TOKEN + "\\n' -}}" if with_images else ""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] != 'system' -%}{{- message['role'] | upper + ': ' -}}{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- elif part['type'] in ('image', 'image_url') -%}" + image_part + "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- ' ' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def train_byte_level_bpe(seed: int, special_tokens: list[str], unk_token: str | None = None) -> Tokenizer:
    """A deterministic ~512-token byte-level BPE, trained on the tiny corpus, with `special_tokens` first."""
    backend = Tokenizer(models.BPE(unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        # Seeding the full byte alphabet means any input text encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_corpus(seed), trainer=trainer)
    return backend


def build_tokenizer(
    seed: int = DEFAULT_SEED, *, with_images: bool = True, extra_special_tokens: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a deterministic ~512-token byte-level BPE tokenizer with LLaVA special tokens."""
    special = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN]
    backend = train_byte_level_bpe(seed, special, unk_token=UNK_TOKEN)
    bos_id = backend.token_to_id(BOS_TOKEN)
    # Prepend BOS like Llama so prompts tokenized by the processor match real LLaVA checkpoints.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        # Naming the token is what creates tokenizer.image_token/image_token_id for the processors.
        extra_special_tokens={"image_token": IMAGE_TOKEN, **(extra_special_tokens or {})},
        chat_template=chat_template(with_images),
        model_max_length=MAX_POSITIONS,
        # Decoder-only batched generation is only correct with left padding.
        padding_side="left",
    )


def make_test_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """Return a deterministic random-noise RGB image of ``size`` (width, height)."""
    width, height = size
    data = random.Random(seed).randbytes(width * height * 3)
    return Image.frombytes("RGB", (width, height), data)


# The LLaVA configs declare no initializer_range of their own: the projector and lm_head fall back
# to the text config's, so setting it on the two sub-configs covers every weight.
def language_fields(tokenizer: PreTrainedTokenizerFast, **sizes: int) -> dict[str, Any]:
    """A tiny language model's config fields: `sizes` (default the tiny 64-wide, 2-layer shape), the
    tokenizer's special ids, and the wide initialisation that makes outputs depend on the input."""
    shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": MAX_POSITIONS,
    }
    return {
        "vocab_size": len(tokenizer),
        **shape,
        **sizes,
        "initializer_range": INITIALIZER_RANGE,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def _text_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(**language_fields(tokenizer))


def _build_language_model(out_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> Path:
    finish_model(model, tokenizer)
    return _save(Path(out_dir), model, tokenizer)


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
        initializer_range=INITIALIZER_RANGE,
    )


def _clip_image_processor(side: int = IMAGE_SIZE) -> CLIPImageProcessor | CLIPImageProcessorPil:
    # The torchvision classes are what real llava-hf checkpoints name, but torchvision is not a
    # project dependency; the PIL twins build where it is missing (AutoProcessor loads either).
    cls = CLIPImageProcessor if is_torchvision_available() else CLIPImageProcessorPil
    return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _llava_next_image_processor() -> LlavaNextImageProcessor | LlavaNextImageProcessorPil:
    cls = LlavaNextImageProcessor if is_torchvision_available() else LlavaNextImageProcessorPil
    return cls(size=_RESIZE, crop_size=_CROP, image_grid_pinpoints=GRID_PINPOINTS)


def _unprintable_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    # Added tokens too: a family's turn markers (`<|im_end|>`, `<|eot_id|>`) end a turn, so a random
    # model that wrote them would stop where `generate` (which knows only the eos) does not.
    ids = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        assert isinstance(text, str)
        # Lone UTF-8 continuation bytes decode to U+FFFD; whitespace-only text reads as empty output.
        if not text.strip() or not text.isprintable() or "\ufffd" in text:
            ids.add(token_id)
    return sorted(ids)


def finish_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """Makes greedy output printable text that never stops by itself, and sets the special ids."""
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        # A zero row scores 0, below the best of ~500 random logits, so greedy decoding never
        # picks special/unprintable tokens and never stops by EOS on its own.
        head.weight[_unprintable_token_ids(tokenizer)] = 0.0
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.float()
    model.eval()


def save_quietly(model: PreTrainedModel, out_dir: Path) -> None:
    """`model.save_pretrained(out_dir)` without a "Writing model shards" bar per tiny file (noise in
    test logs); the user's progress-bar setting is restored."""
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _save(out_dir: Path, model: PreTrainedModel, processor: ProcessorMixin | PreTrainedTokenizerBase) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_quietly(model, out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _llava_config_fields(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """What LLaVA-1.5 and LLaVA-NeXT configs share: towers, image token, feature selection."""
    return {
        "vision_config": _vision_config(),
        "text_config": _text_config(tokenizer),
        "image_token_index": tokenizer.image_token_id,
        "image_seq_length": IMAGE_TOKENS_PER_IMAGE,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "projector_hidden_act": "gelu",
    }


def _llava_processor_fields(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "tokenizer": tokenizer,
        "patch_size": PATCH_SIZE,
        "num_additional_image_tokens": 1,
        "vision_feature_select_strategy": "default",
        "chat_template": chat_template(with_images=True),
    }


def build_llava15(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Build a tiny LLaVA-1.5 (CLIP + Llama) checkpoint with its processor into ``out_dir``."""
    tokenizer = build_tokenizer(seed)
    config = LlavaConfig(**_llava_config_fields(tokenizer))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    finish_model(model, tokenizer)
    processor = LlavaProcessor(image_processor=_clip_image_processor(), **_llava_processor_fields(tokenizer))
    return _save(Path(out_dir), model, processor)


def build_llava_next(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Build a tiny LLaVA-NeXT (any-resolution) checkpoint with its processor into ``out_dir``."""
    tokenizer = build_tokenizer(seed)
    config = LlavaNextConfig(**_llava_config_fields(tokenizer), image_grid_pinpoints=GRID_PINPOINTS)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    finish_model(model, tokenizer)
    processor = LlavaNextProcessor(image_processor=_llava_next_image_processor(), **_llava_processor_fields(tokenizer))
    return _save(Path(out_dir), model, processor)


def build_internvl(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Build a tiny InternVL (InternViT + Qwen2); its processor needs torchvision (a video processor)."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    tokenizer = build_tokenizer(
        seed,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=[IMAGE_SIZE, IMAGE_SIZE],
            patch_size=[PATCH_SIZE, PATCH_SIZE],
            initializer_range=INITIALIZER_RANGE,
        ),
        text_config=Qwen2Config(**language_fields(tokenizer)),
        image_token_id=tokenizer.context_image_token_id,
        # 16 patches per image, pixel-shuffled by 0.5 in each direction: 4 image tokens.
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    finish_model(model, tokenizer)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False, max_patches=1),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=4,
        chat_template=chat_template(with_images=True),
    )
    return _save(Path(out_dir), model, processor)


def build_text_only(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Build a tiny Llama causal LM with the same tokenizer (image parts dropped by its template)."""
    tokenizer = build_tokenizer(seed, with_images=False)
    torch.manual_seed(seed)
    return _build_language_model(out_dir, LlamaForCausalLM(_text_config(tokenizer)), tokenizer)


def build_sliding_window(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Build a tiny Mistral whose sliding-window attention gives a KV cache that cannot be batched."""
    tokenizer = build_tokenizer(seed, with_images=False)
    # Shorter than the prompts the tests send, so the window really slides.
    config = MistralConfig(**language_fields(tokenizer), sliding_window=16)
    torch.manual_seed(seed)
    return _build_language_model(out_dir, MistralForCausalLM(config), tokenizer)


# The vision benchmark's LLaVA-1.5: LLaVA-1.5's image geometry (a 336 px CLIP tower with 14 px
# patches: 24 x 24 = 576 image tokens per image) in front of the text benchmark's 21 M-parameter Llama.
BENCH_IMAGE_SIZE = 336
BENCH_PATCH_SIZE = 14
BENCH_IMAGE_TOKENS = (BENCH_IMAGE_SIZE // BENCH_PATCH_SIZE) ** 2
BENCH_MAX_POSITIONS = 2048


def _benchmark_llama_fields(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The benchmarks' language model: hidden 512, 8 layers, about 21 M parameters."""
    return language_fields(
        tokenizer,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=BENCH_MAX_POSITIONS,
    )


def benchmark_llava15_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The vision benchmark's config (see `build_benchmark_llava15`)."""
    # CLIP-L/336 (1024 wide, 24 layers, ~300 M parameters) costs about 4 % of LLaVA-1.5-7B's image
    # prefill, but would take seconds per image on a 2-core CPU. This tower keeps its geometry (577
    # positions, 64-wide heads, layer -2 selected) and costs ~20 ms per image, 6-7 % of this model's
    # ~0.3 s image prefill: the same order as the real pair, so the LM's prefill is what dominates.
    vision = CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=3,
        num_attention_heads=3,
        image_size=BENCH_IMAGE_SIZE,
        patch_size=BENCH_PATCH_SIZE,
        projection_dim=192,
        initializer_range=INITIALIZER_RANGE,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_benchmark_llama_fields(tokenizer)),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=BENCH_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def build_benchmark_llava15(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Build the vision benchmark's random LLaVA-1.5: a 336 px CLIP tower (patch 14, 576 image tokens
    per image; 192 wide, 3 layers), the two-layer projector and the text benchmark's Llama (hidden
    512, 8 layers, about 21 M parameters), with greedy output that never stops by itself."""
    tokenizer = build_tokenizer(seed)
    # Image tokens included, the web UI's conversations outgrow the tiny fixtures' 512 positions.
    tokenizer.model_max_length = BENCH_MAX_POSITIONS
    config = benchmark_llava15_config(tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    finish_model(model, tokenizer)
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(BENCH_IMAGE_SIZE),
        **{**_llava_processor_fields(tokenizer), "patch_size": BENCH_PATCH_SIZE},
    )
    return _save(Path(out_dir), model, processor)


def build_benchmark_llama(out_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Build the benchmark's random Llama: hidden 512, 8 layers, about 21 M parameters."""
    tokenizer = build_tokenizer(seed, with_images=False)
    config = LlamaConfig(**_benchmark_llama_fields(tokenizer))
    torch.manual_seed(seed)
    return _build_language_model(out_dir, LlamaForCausalLM(config), tokenizer)


_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava-1.5": build_llava15,
    "llava-next": build_llava_next,
    "text-only": build_text_only,
    "sliding-window": build_sliding_window,
}
# InternVL's processor cannot be built (nor loaded) without torchvision.
if is_torchvision_available():
    _BUILDERS["internvl"] = build_internvl


def _is_complete(path: Path, stamp: str) -> bool:
    marker = path / MARKER_FILE
    return marker.is_file() and marker.read_text() == stamp


def build_each_atomically(
    builders: Mapping[str, Callable[[Path], object]],
    directories: Mapping[str, str],
    root: Path,
    stamp: str,
    force: bool,
) -> dict[str, Path]:
    """Builds each named checkpoint into `root / directories[name]` (see build_atomically); returns the paths."""
    paths: dict[str, Path] = {}
    for name, builder in builders.items():
        paths[name] = root / directories[name]
        build_atomically(builder, paths[name], stamp, force)
    return paths


def build_atomically(builder: Callable[[Path], object], target: Path, stamp: str, force: bool) -> None:
    """Runs `builder` into a fresh directory that becomes `target`, unless `target` is already complete
    with the same `stamp` (a build version, plus whatever else the files depend on)."""
    if _is_complete(target, stamp) and not force:
        return
    # Build beside the target and rename into place so parallel test workers never see a
    # half-written directory; the marker, written last, flags builds that died midway.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    # mkdtemp makes the directory owner-only; the renamed checkpoint should read like any other.
    staging.chmod(0o755)
    try:
        builder(staging)
        # safetensors writes its files owner-only; checkpoints should be readable like any download.
        for path in staging.iterdir():
            path.chmod(0o644)
        (staging / MARKER_FILE).write_text(stamp)
        if target.exists() and (force or not _is_complete(target, stamp)):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same checkpoint first; keep theirs.
            if not _is_complete(target, stamp):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_all(root: Path, force: bool = False) -> dict[str, Path]:
    """Build every tiny checkpoint under ``root`` (skipping complete ones unless ``force``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, builder in _BUILDERS.items():
        target = root / CHECKPOINT_DIRS[name]
        build_atomically(builder, target, BUILD_VERSION + "\n", force)
        paths[name] = target
    return paths
