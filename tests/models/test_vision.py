"""Images taken apart: each image's token run, a content key that ignores the encoding, and tower
features per image that equal the model's own for the whole prompt."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from llava_worker.config import WorkerConfig
from llava_worker.models.images import ImageLimits
from llava_worker.models.inputs import prepare_inputs
from llava_worker.models.loaded import LoadedModel
from llava_worker.models.vision import encode_images, image_token_id, tower_layout
from tests.support.kinds import IMAGE_KINDS
from tests.support.payloads import PROMPT_2, encode_image
from tests.support.servers import ModelCache


def loaded_model(checkpoints: dict[str, Path], models: ModelCache, kind: str) -> LoadedModel:
    return models.get(WorkerConfig(model_path=str(checkpoints[kind]), device="cpu", no_register=True))


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_each_image_gets_its_token_run_and_the_features_the_model_computes(
    checkpoints: dict[str, Path], models: ModelCache, kind: str
) -> None:
    loaded = loaded_model(checkpoints, models, kind)
    images = (encode_image(5, (64, 40)), encode_image(6, (30, 70)))
    inputs = prepare_inputs(loaded, PROMPT_2, images, ImageLimits())
    spans = inputs.images
    assert spans is not None and len(spans) == 2
    ids = inputs.input_ids[0]
    token = image_token_id(loaded.model)
    assert token is not None
    marks = ids.eq(token)
    for span in spans:
        assert bool(marks[span.start : span.end].all())
    assert int(marks.sum()) == sum(span.length for span in spans)
    assert spans[0].key != spans[1].key

    model: Any = loaded.model
    layout = tower_layout(model)
    assert layout is not None
    with torch.inference_mode():
        tower_inputs = ("pixel_values", "image_sizes", "batch_num_images")
        pixels = {name: value for name, value in inputs.tensors.items() if name in tower_inputs}
        whole = model.model.get_image_features(**pixels, return_dict=True).pooler_output
        parts = whole if isinstance(whole, list | tuple) else [whole]
        expected = torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])
        together = torch.cat(encode_images(model, layout, list(spans)))
        # The second image alone: features do not depend on what else is in the tower's batch.
        alone = encode_images(model, layout, [spans[1]])[0]
    torch.testing.assert_close(together, expected)
    torch.testing.assert_close(alone, together[spans[0].length :])


def test_the_content_key_is_the_same_for_the_same_pixels_in_another_file_format(
    checkpoints: dict[str, Path], models: ModelCache
) -> None:
    loaded = loaded_model(checkpoints, models, "llava-1.5")

    def key_of(image: str) -> bytes:
        spans = prepare_inputs(loaded, "USER: <image>\nHi ASSISTANT:", (image,), ImageLimits()).images
        assert spans is not None
        return spans[0].key

    assert key_of(encode_image(7, fmt="PNG")) == key_of(encode_image(7, fmt="BMP"))
    assert key_of(encode_image(7)) != key_of(encode_image(8))


def test_images_with_no_token_between_them_go_through_the_model_whole(
    checkpoints: dict[str, Path], models: ModelCache
) -> None:
    loaded = loaded_model(checkpoints, models, "llava-1.5")
    inputs = prepare_inputs(
        loaded, "USER: <image><image>\nHi ASSISTANT:", (encode_image(1), encode_image(2)), ImageLimits()
    )
    assert inputs.images is None
    text = prepare_inputs(loaded, "USER: Hi ASSISTANT:", (), ImageLimits())
    assert text.images == ()


def test_prepared_inputs_stay_in_host_memory_until_moved(checkpoints: dict[str, Path], models: ModelCache) -> None:
    """Preparing happens before a request waits for its turn: nothing of it may sit on the device yet."""
    loaded = loaded_model(checkpoints, models, "llava-1.5")
    on_meta = replace(loaded, device=torch.device("meta"))  # a device no host tensor is on
    inputs = prepare_inputs(on_meta, PROMPT_2, (encode_image(5), encode_image(6)), ImageLimits())
    assert inputs.images
    host = [*inputs.tensors.values(), *(v for span in inputs.images for v in span.pixels.values())]
    assert all(t.device.type == "cpu" for t in host if isinstance(t, torch.Tensor))
    assert inputs.tensors["pixel_values"].dtype == loaded.dtype
    moved = inputs.on_device(torch.device("meta"))
    assert moved.images
    on_device = [*moved.tensors.values(), *(v for span in moved.images for v in span.pixels.values())]
    assert all(t.device.type == "meta" for t in on_device if isinstance(t, torch.Tensor))
    assert [span.key for span in moved.images] == [span.key for span in inputs.images]
