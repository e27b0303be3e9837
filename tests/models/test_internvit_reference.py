"""Self-checks of the InternVL-Chat-1.0 reference (tests/support/internvit_reference.py), no worker: its
InternViT-6B behaves as the facts say, each mutation variant and each decoy in the tiny checkpoints
changes the answer, and the answer depends on the image. The worker tests rely on these contrasts."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessorPil

from llava_worker.testing.tiny import make_test_image
from llava_worker.testing.tiny_internvl_chat import IMAGE_TOKENS
from tests.support.internvit_reference import (
    CONTRAST_IMAGE,
    CONTRAST_PROMPT,
    CONTRAST_TOKENS,
    VARIANTS,
    internvit_image_processor,
    internvit_pad_colour,
    tower_kind,
)
from tests.support.original_reference import load_internvit, load_weights, reference_generate

CHATS = {"internvl-chat-7b": "internvit-224-tower", "internvl-chat-13b-448px": "internvit-448-tower"}
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TOWER_COPY = "model.vision_tower.vision_tower."


def _contrast_image():
    seed, size = CONTRAST_IMAGE
    return make_test_image(seed, size)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("OpenGVLab/InternViT-6B-224px", "internvit-6b"),
        ("/models/pretrained/intern_vit_6b_224px", "internvit-6b"),
        ("OpenGVLab/InternVL-14B-224px", "internvl-14b"),
        ("/models/EVA-CLIP/InternViT-6B-224px", "eva"),  # the copy tests EVA first
        ("openai/clip-vit-large-patch14-336", "clip"),
        ("/models/internvit-6b-224px", "clip"),  # the substring tests are case-sensitive
    ],
)
def test_the_tower_is_chosen_by_the_copys_name_rules(name, kind):
    assert tower_kind(name) == kind


def test_crop_size_and_pad_colour_follow_the_facts(checkpoints):
    assert internvit_image_processor(str(checkpoints["internvit-224-tower"])).crop_size["height"] == 336
    assert internvit_image_processor(str(checkpoints["internvit-448-tower"])).crop_size["height"] == 448
    assert internvit_pad_colour() == (123, 116, 103)
    assert internvit_pad_colour("pad-colour-off-by-one") == (124, 116, 103)


@pytest.mark.parametrize("tower", ["internvit-224-tower", "internvit-448-tower"])
def test_at_native_size_the_position_table_is_used_as_stored(checkpoints, tower):
    model = load_internvit(checkpoints[tower])
    grid = model.shape.grid
    stored = model.weights["embeddings.position_embedding"]
    assert torch.equal(model.position_table(grid, grid), stored)
    pixels = torch.randn(
        2, 3, model.shape.image_size, model.shape.image_size, generator=torch.Generator().manual_seed(0)
    )
    interpolated, direct = model.hidden_states(pixels), model.hidden_states(pixels, interpolate=False)
    assert len(interpolated) == model.shape.layers + 1
    for with_table, without in zip(interpolated, direct, strict=True):
        assert torch.equal(with_table, without)


def test_the_224_tower_at_336_px_interpolates_its_position_table(checkpoints):
    bicubic = load_internvit(checkpoints["internvit-224-tower"])
    bilinear = load_internvit(checkpoints["internvit-224-tower"], "bilinear-interpolation")
    table = bicubic.position_table(12, 12)
    assert table.shape == (1, 12 * 12 + 1, bicubic.shape.hidden)
    stored = bicubic.weights["embeddings.position_embedding"]
    assert torch.equal(table[:, 0], stored[:, 0]), "the CLS position is kept as it is"
    assert (table - bilinear.position_table(12, 12)).abs().max() > 0.05


@pytest.mark.parametrize("name", list(CHATS))
def test_image_token_counts(checkpoints, name):
    tower = checkpoints[CHATS[name]]
    pixels = internvit_image_processor(str(tower))(_contrast_image(), return_tensors="pt")["pixel_values"]
    states = load_internvit(tower).hidden_states(pixels)
    assert states[-4].shape[1] - 1 == IMAGE_TOKENS[name]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_changes_the_answer(checkpoints, variant):
    images = [_contrast_image()]
    original = reference_generate(checkpoints["internvl-chat-7b"], CONTRAST_PROMPT, images, CONTRAST_TOKENS)
    mutated = reference_generate(
        checkpoints["internvl-chat-7b"], CONTRAST_PROMPT, images, CONTRAST_TOKENS, variant=variant
    )
    assert mutated != original


def test_without_interpolation_the_bilinear_variant_changes_nothing(checkpoints):
    checkpoint, images = checkpoints["internvl-chat-13b-448px"], [_contrast_image()]
    original = reference_generate(checkpoint, CONTRAST_PROMPT, images, CONTRAST_TOKENS)
    assert reference_generate(
        checkpoint, CONTRAST_PROMPT, images, CONTRAST_TOKENS, variant="bilinear-interpolation"
    ) == (original)


@pytest.mark.parametrize("name", list(CHATS))
def test_the_answer_depends_on_the_image(checkpoints, name):
    first = reference_generate(checkpoints[name], PROMPT, [make_test_image(1, (40, 30))], 16)
    other = reference_generate(checkpoints[name], PROMPT, [make_test_image(7, (40, 30))], 16)
    assert first != other


@pytest.mark.parametrize("name", list(CHATS))
def test_the_tower_copy_in_the_checkpoint_differs_and_would_change_the_answer(checkpoints, tmp_path, name):
    tower = checkpoints[CHATS[name]]
    real = load_weights(tower)
    copy = {k[len(TOWER_COPY) :]: v for k, v in load_weights(checkpoints[name]).items() if k.startswith(TOWER_COPY)}
    assert copy.keys() == real.keys()
    assert all((copy[key] - real[key]).abs().max() > 0.05 for key in real)
    # A tower directory holding the copy (same name rules, so the same crop size) gives another answer.
    decoy = tmp_path / tower.name
    decoy.mkdir()
    shutil.copy(tower / "config.json", decoy / "config.json")
    save_file(copy, str(decoy / "model.safetensors"))
    images = [_contrast_image()]
    original = reference_generate(checkpoints[name], CONTRAST_PROMPT, images, CONTRAST_TOKENS)
    assert reference_generate(checkpoints[name], CONTRAST_PROMPT, images, CONTRAST_TOKENS, vision_tower=decoy) != (
        original
    )


def test_the_stray_mm_projector_bin_differs_and_would_change_the_answer(checkpoints, tmp_path):
    checkpoint = checkpoints["internvl-chat-7b"]
    stray = torch.load(checkpoint / "mm_projector.bin", weights_only=True)
    weights = load_weights(checkpoint)
    assert stray.keys() == {key for key in weights if key.startswith("model.mm_projector.")}
    assert all((stray[key].float() - weights[key]).abs().max() > 0.05 for key in stray)
    # The same checkpoint with the stray projector in place of its own answers differently.
    swapped = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, swapped)
    for shard in swapped.glob("model-*.safetensors"):
        tensors = load_file(shard)
        tensors.update({key: stray[key].float() for key in stray if key in tensors})
        save_file(tensors, str(shard), metadata={"format": "pt"})
    images = [_contrast_image()]
    original = reference_generate(checkpoint, CONTRAST_PROMPT, images, CONTRAST_TOKENS)
    assert reference_generate(swapped, CONTRAST_PROMPT, images, CONTRAST_TOKENS) != original


def test_the_tower_repositorys_preprocessor_config_is_a_decoy(checkpoints):
    """The copy builds its processor in code; the file the tower repository ships says otherwise."""
    tower = checkpoints["internvit-224-tower"]
    shipped = CLIPImageProcessorPil.from_pretrained(tower)
    built = internvit_image_processor(str(tower))
    assert shipped.crop_size != built.crop_size
    assert list(shipped.image_mean) != list(built.image_mean)
