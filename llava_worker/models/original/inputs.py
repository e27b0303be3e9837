"""Prompts and images made into model inputs the way the original LLaVA makes them for its own
checkpoints (llava/mm_utils.py): `pad` and `anyres` preprocessing, and chunk-wise tokenisation."""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerBase
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from llava_worker.models.chat_template import LLAVA_V1_CHAT_TEMPLATE
from llava_worker.models.images import pad_to_square
from llava_worker.models.original.checkpoint import IMAGE_END_TOKEN, IMAGE_START_TOKEN, OriginalCheckpoint
from llava_worker.models.original.towers import VisionTower

IMAGE_TOKEN = "<image>"


class OriginalProcessor:
    """Stands in for a transformers processor (same call, same outputs) for original checkpoints."""

    image_token = IMAGE_TOKEN

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: CLIPImageProcessorPil,
        checkpoint: OriginalCheckpoint,
        image_token_id: int,
        tower: VisionTower,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.checkpoint = checkpoint
        self.image_token_id = image_token_id
        self.tower_size, self.patches_per_side = tower.crop_size, tower.patches_per_side
        # The original's checkpoints carry no chat template; LLaVA's v1 conversation is what its UI sends.
        self.chat_template: str = getattr(tokenizer, "chat_template", None) or LLAVA_V1_CHAT_TEMPLATE

    def __call__(
        self, text: list[str], images: list[Image.Image] | None = None, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` and, with images, `pixel_values` (+ `image_sizes` for anyres)
        for one prompt whose `<image>` placeholders match `images` in number."""
        (prompt,) = text
        images = images or []
        if self.checkpoint.use_im_start_end:
            prompt = prompt.replace(IMAGE_TOKEN, IMAGE_START_TOKEN + IMAGE_TOKEN + IMAGE_END_TOKEN)
        prepared = [self._prepare(image) for image in images]
        views = [image_views for image_views, _ in prepared]
        input_ids = self._tokenize(prompt, [count for _, count in prepared])
        tensors: dict[str, torch.Tensor] = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long),
        }
        if not views:
            return tensors
        if self.checkpoint.anyres:
            # LlavaNext takes (images, views, C, H, W), zero-padded to the most views; it reads each
            # image's real number of views back from image_sizes.
            most = max(view.shape[0] for view in views)
            padded = torch.zeros(len(views), most, *views[0].shape[1:])
            for index, view in enumerate(views):
                padded[index, : view.shape[0]] = view
            tensors["pixel_values"] = padded
            tensors["image_sizes"] = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long)
        else:
            tensors["pixel_values"] = torch.cat(views)
        return tensors

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def _tokenize(self, prompt: str, feature_counts: list[int]) -> list[int]:
        """The original's tokenizer_image_token: each chunk between placeholders is tokenised on its
        own (a SentencePiece tokenizer starts every chunk with a word boundary), only the first BOS is
        kept, and each placeholder becomes as many image tokens as the image has features."""
        chunks = [self.tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
        bos = self.tokenizer.bos_token_id
        offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
        ids: list[int] = chunks[0][:offset]
        for index, chunk in enumerate(chunks):
            if index > 0:
                ids += [self.image_token_id] * feature_counts[index - 1]
            ids += chunk[offset:]
        return ids

    def _prepare(self, image: Image.Image) -> tuple[torch.Tensor, int]:
        """The views of one image, (views, C, H, W), as the original's process_images makes them,
        and how many image tokens the model's features for them fill."""
        square_tokens = self.patches_per_side**2
        if self.checkpoint.anyres:
            height, width = self._best_resolution(image)
            return self._anyres_views(image, height, width), square_tokens + self._unpadded_tokens(image, height, width)
        if self.checkpoint.pads_to_square:
            image = pad_to_square(image, tuple(int(x * 255) for x in self.image_processor.image_mean))
        return self._pixels(image), square_tokens + (1 if self.checkpoint.keeps_cls else 0)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = self.image_processor(image, return_tensors="pt")["pixel_values"]
        return pixels

    def _best_resolution(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) among the grid pinpoints; ties go to the first listed, as in the original."""
        height, width = select_best_resolution((image.height, image.width), self.checkpoint.grid_pinpoints_hw)
        return int(height), int(width)

    def _anyres_views(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The original's process_anyres_image: a squashed whole-image view, then the tiles of the
        image resized into the best resolution (height, width), aspect kept, black borders, row by row."""
        canvas = _resize_and_pad(image, width, height)
        tile = int(self.image_processor.crop_size["height"])
        tiles = [
            canvas.crop((left, top, left + tile, top + tile))
            for top in range(0, height, tile)
            for left in range(0, width, tile)
        ]
        side = int(self.image_processor.size["shortest_edge"])
        views = [image.resize((side, side)), *tiles]
        return torch.cat([self._pixels(view) for view in views])

    def _unpadded_tokens(self, image: Image.Image, height: int, width: int) -> int:
        """Image tokens of the tiles once their padding is cut off, a newline ending each row."""
        grid = torch.empty(
            1,
            height // self.tower_size * self.patches_per_side,
            width // self.tower_size * self.patches_per_side,
            device="meta",
        )
        # The model's own unpadding decides how many rows and columns remain.
        rows, columns = unpad_image(grid, [image.height, image.width]).shape[1:]
        return int(rows) * (int(columns) + 1)


def _resize_and_pad(image: Image.Image, width: int, height: int) -> Image.Image:
    """The original's resize_and_pad_image: fit inside (width, height) keeping the aspect ratio,
    centred on black."""
    scale_w, scale_h = width / image.width, height / image.height
    if scale_w < scale_h:
        new_width, new_height = width, min(math.ceil(image.height * scale_w), height)
    else:
        new_width, new_height = min(math.ceil(image.width * scale_h), width), height
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize((new_width, new_height)), ((width - new_width) // 2, (height - new_height) // 2))
    return canvas
