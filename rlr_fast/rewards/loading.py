"""Reward networks from LOCAL files (never downloaded), and the two options every frozen reward
network takes: its precision and activation checkpointing of its vision tower.

Missing or unusable weights raise an error that says what to download or which `rlr-fast convert`
command makes the file, where to put it, and how to pass another path, in Python
(`get_reward(name, clip_path=...)`) and on the command line
(`--set 'reward_kwargs={clip_path: ...}'`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

PathLike = Union[str, os.PathLike]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_load_reason(error: Exception) -> str:
    """torch.load's error without its advice to retry with weights_only=False (which would run the
    file's pickled code: unsafe, and never what a released checkpoint needs)."""
    text = str(error)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.strip()
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return "it is not a torch.save file" if "weights_only" in first else first


def weights_dir() -> Path:
    """Where the default weight paths live: $RLR_FAST_WEIGHTS, else ./weights."""
    return Path(os.environ.get("RLR_FAST_WEIGHTS", "weights"))


def pass_paths(reward: str, **placeholders: str) -> str:
    """How to point `reward` at other files, in Python and on the command line."""
    python = ", ".join(f"{key}=<{value}>" for key, value in placeholders.items())
    yaml = ", ".join(f"{key}: <{value}>" for key, value in placeholders.items())
    return f"Or pass get_reward({reward!r}, {python}) in Python, --set 'reward_kwargs={{{yaml}}}' on the command line."


def require_model_folder(folder: Path, what: str, how: str) -> None:
    """FileNotFoundError saying how to get the model unless `folder` holds a transformers model."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what}: no config.json in {folder}. {how}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{what}: no weights ({' or '.join(WEIGHT_FILES)}) in {folder}. {how}")


def require_tokenizer(folder: Path, needed: tuple[tuple[str, ...], ...], what: str, how: str) -> None:
    """FileNotFoundError unless one of the alternative file sets in `needed` is all present."""
    if not any(all((folder / name).is_file() for name in option) for option in needed):
        options = " or ".join(" + ".join(option) for option in needed)
        raise FileNotFoundError(f"{what}: no tokenizer files ({options}) in {folder}. {how}")


def load_pretrained(model_class: type, folder: Path, model_type: str, needed_prefixes: tuple[str, ...],
                    dtype: torch.dtype, what: str, how: str) -> nn.Module:
    """`model_class.from_pretrained(folder)`, refusing a folder of another architecture or one that
    leaves any weight under `needed_prefixes` at its random initialisation."""
    found = json.loads((folder / "config.json").read_text()).get("model_type")
    if found != model_type:
        raise ValueError(f"{what}: {folder} holds a {found!r} model, expected a transformers {model_class.__name__} "
                         f"(model_type {model_type!r}). {how}")
    from transformers.utils import logging as transformers_logging

    # transformers' load report would list weights no reward uses (BLIP's ITM head, which ImageReward.pt
    # lacks); the weights a reward does use are checked below instead.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(folder, dtype=dtype, local_files_only=True, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = sorted(k for k in info["missing_keys"] if k.startswith(needed_prefixes))
    if missing:
        raise ValueError(f"{what}: {folder} lacks {len(missing)} of the weights it needs (e.g. {missing[:3]}); scoring "
                         f"would use random weights there. {how}")
    return model


def reward_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """The precision of a reward's frozen network: a torch dtype or its name ('float16', as in YAML)."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"reward dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype.removeprefix("torch.")]
    if dtype not in DTYPES.values():
        raise TypeError(f"reward dtype must be one of {sorted(DTYPES)} (or the torch dtype), got {dtype!r}")
    return dtype


class CheckpointedForward:
    """A layer's forward under non-reentrant activation checkpointing whenever a graph is built: the
    forward keeps only the layer's input, the backward recomputes the layer's activations."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Checkpoint each layer of a frozen tower in eval mode.

    transformers' own `gradient_checkpointing_enable` acts only in training mode, and a reward stays
    in eval mode (no dropout), so each layer's forward is wrapped instead; parameter names and the
    state dict are unchanged.
    """
    for layer in layers:
        layer.forward = CheckpointedForward(layer.forward)


def freeze(module: nn.Module) -> None:
    module.requires_grad_(False).eval()


def device_of(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype
