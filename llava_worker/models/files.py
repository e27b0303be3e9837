"""Finds a checkpoint's files (a local directory or a hub snapshot) and reads its raw config and weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from llava_worker.errors import StartupError

#: Everything a checkpoint in any of the layouts the worker serves may need; optimizer states,
#: training logs and other frameworks' weights are never downloaded.
_WANTED_FILES = ("*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt", "*.tiktoken", "*.jinja")
#: Weight files in the order of preference: the first layout a directory has is the one read.
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def looks_local(model_path: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else can only mean a local path."""
    return (
        model_path.startswith(("/", ".", "~"))
        or model_path.count("/") > 1
        or os.path.exists(model_path)
        or "\\" in model_path
    )


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, short enough for a start-up error."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:397] + "..."


def read_raw_config(model_path: str, flag: str = "--model-path") -> dict[str, Any] | None:
    """`config.json` exactly as written, or None when the checkpoint has none (a bare adapter).

    Read as JSON rather than through AutoConfig, which refuses `llava_llama` and silently turns an
    original `"llava"` config into a different model.
    """
    if os.path.isdir(model_path):
        path = Path(model_path) / "config.json"
        if not path.is_file():
            return None
    elif looks_local(model_path):
        raise StartupError(f"{flag} {model_path} does not exist")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(model_path, "config.json"))
        except EntryNotFoundError:
            return None
        except Exception as exc:  # the hub client raises many types; all mean "cannot use this id"
            raise _unusable_hub_id(flag, model_path, exc) from exc
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StartupError(f"{flag} {model_path}: config.json cannot be read: {one_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise StartupError(f"{flag} {model_path}: config.json does not hold a JSON object")
    return raw


def _unusable_hub_id(flag: str, model_path: str, exc: BaseException) -> StartupError:
    return StartupError(f"{flag} {model_path} is not usable as a model on the Hugging Face hub: {one_line(exc)}")


def local_directory(model_path: str, flag: str) -> Path:
    """A directory holding the checkpoint's files: the path itself, or a hub snapshot of the id."""
    if os.path.isdir(model_path):
        return Path(model_path)
    if looks_local(model_path):
        raise StartupError(f"{flag} {model_path} does not exist")
    from huggingface_hub import constants, list_repo_files, snapshot_download

    try:
        if constants.HF_HUB_OFFLINE:
            # Offline (HF_HUB_OFFLINE=1) the cached snapshot is all there is, and listing needs the network.
            return Path(snapshot_download(model_path, allow_patterns=list(_WANTED_FILES)))
        files = list_repo_files(model_path)
        ignore = ["pytorch_model*.bin"] if any(name.endswith(".safetensors") for name in files) else []
        return Path(snapshot_download(model_path, allow_patterns=list(_WANTED_FILES), ignore_patterns=ignore))
    except Exception as exc:  # the hub client raises many types; all mean "cannot use this id"
        raise _unusable_hub_id(flag, model_path, exc) from exc


def has_weights(directory: Path) -> bool:
    """Whether the directory holds full model weights (in any of the layouts `read_weights` reads)."""
    return any((directory / name).is_file() for name in (*_WEIGHT_INDEXES, *_WEIGHT_FILES))


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model weights in `directory`: sharded or single, safetensors or `.bin`."""
    for index_name in _WEIGHT_INDEXES:
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                weights.update(read_tensor_file(directory / shard))
            return weights
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return read_tensor_file(directory / name)
    raise StartupError(f"{directory} holds no model weights (model.safetensors or pytorch_model.bin, or their shards)")


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """One `.safetensors` or `.bin` file; `.bin` files are unpickled with tensors only, never code."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types; all mean "cannot use this file"
        raise StartupError(f"{path} cannot be read: {one_line(exc)}") from exc
    if not isinstance(loaded, dict):
        raise StartupError(f"{path} does not hold a dictionary of tensors")
    return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
