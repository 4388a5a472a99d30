"""LoRA adapters on a diffusers UNet, in the formats diffusers reads.

`add_lora` puts peft LoRA layers on the attention projections (diffusers' native route, or peft's
injection for UNets without the mixin); `save_lora` writes `pytorch_lora_weights.safetensors`, which
the model family's pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, ...:
rlr_fast.families) reads with `load_lora_weights`, with the exact alpha / rank in its metadata;
`load_lora` reads it back; `lora_disabled` runs the base model without a second copy of its weights.
Imports only torch, diffusers, peft, safetensors and rlr_fast.families (torch only).
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import diffusers
import safetensors
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from .families import family_of

__all__ = ["add_lora", "save_lora", "load_lora", "has_lora", "lora_disabled", "lora_parameters", "LORA_WEIGHT_NAME"]

# The file name a diffusers pipeline's `load_lora_weights(dir)` looks for first.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers' default adapter name (`ModelMixin.add_adapter`); we keep one adapter per UNet.
_ADAPTER = "default"
# Where diffusers stores the peft LoraConfig inside the safetensors header (its entries, like the
# weights', prefixed with the network's component name: the family's lora_prefix).
_LORA_METADATA_KEY = "lora_adapter_metadata"


def add_lora(unet: UNet2DConditionModel, rank: int = 4, alpha: float = 4,
             targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
             seed: int | None = None) -> UNet2DConditionModel:
    """Add a LoRA adapter to the UNet's attention projections, in place; returns the UNet.

    Uses `unet.add_adapter(LoraConfig(...))`, the diffusers-native route, so the adapter saves in
    the format `StableDiffusionPipeline.load_lora_weights` reads. The base weights are frozen; only
    the LoRA matrices require grad. peft zeroes lora_B, so a fresh adapter leaves the output
    unchanged; `seed` makes lora_A's random init reproducible without touching the global RNG.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if hasattr(unet, "add_adapter"):
            unet.add_adapter(config, adapter_name=_ADAPTER)
        else:  # diffusers gives some UNets (UNet3DConditionModel) no peft mixin: the same peft layers, injected
            inject_adapter_in_model(config, unet, adapter_name=_ADAPTER)  # also sets unet.peft_config
    return unet


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should update: those that require grad (the LoRA matrices
    after `add_lora`)."""
    return [p for p in module.parameters() if p.requires_grad]


@contextlib.contextmanager
def lora_disabled(unet: UNet2DConditionModel):
    """While entered, the UNet is its base model: its LoRA adapter is switched off (not removed), and
    every requires_grad flag is as before afterwards (peft's switch sets the adapter's flags). A UNet
    without an adapter is a ValueError: there is no base model to switch to."""
    if not has_lora(unet):
        raise ValueError("the UNet has no LoRA adapter to switch off; load one with load_lora (or add_lora)")
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    # peft's layers directly: diffusers gives some UNets (UNet3DConditionModel) no disable_adapters
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def has_lora(unet: nn.Module) -> bool:
    """Whether the UNet carries the LoRA adapter `add_lora` / `load_lora` give it."""
    return _adapter_config(unet) is not None


def _adapter_config(unet: nn.Module) -> LoraConfig | None:
    return getattr(unet, "peft_config", {}).get(_ADAPTER)


def save_lora(unet: UNet2DConditionModel, directory: str | Path) -> Path:
    """Save the UNet's LoRA as `directory/pytorch_lora_weights.safetensors`; returns the file path.

    diffusers format (keys `unet.<module>.lora.down/up.weight`) with the peft LoraConfig in the
    safetensors metadata, written by the model family's pipeline (rlr_fast.families), so that its
    `load_lora_weights(directory)` (`StableDiffusionXLPipeline`'s for SDXL) restores the exact scaling
    alpha / rank (without it, diffusers would assume alpha = rank). Written into a hidden temporary
    folder and renamed, so a crash leaves the old file or the new one.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        # diffusers only logs an error and writes nothing in this case
        raise NotADirectoryError(f"save_lora needs a directory, but {directory} is a file")
    config = _adapter_config(unet)
    if config is None:
        raise ValueError("the UNet has no LoRA adapter to save; call add_lora first")
    peft_state = get_peft_model_state_dict(unet, adapter_name=_ADAPTER)
    state = {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(peft_state).items()}
    directory.mkdir(parents=True, exist_ok=True)
    family = family_of(unet)
    with tempfile.TemporaryDirectory(prefix=".tmp", dir=directory) as tmp:
        layers = {f"{family.lora_prefix}_lora_layers": state,
                  f"{family.lora_prefix}_lora_adapter_metadata": config.to_dict()}
        getattr(diffusers, family.lora_pipeline).save_lora_weights(save_directory=tmp, safe_serialization=True,
                                                                   **layers)
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, directory / LORA_WEIGHT_NAME)
    return directory / LORA_WEIGHT_NAME


def load_lora(unet: UNet2DConditionModel, directory: str | Path) -> UNet2DConditionModel:
    """Load a LoRA written by `save_lora` into the UNet, in place; returns the UNet.

    Adds the adapter (with the saved rank, alpha and targets) if the UNet has none; if it has one,
    its weights are overwritten in place, so an optimizer holding them stays valid. For LoRA files
    from other trainers use the pipeline's `load_lora_weights`.
    """
    file = Path(directory) / LORA_WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {file} (save_lora writes {LORA_WEIGHT_NAME} into its directory)")
    try:
        with safetensors.safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # e.g. a pickle under the safetensors name
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if _LORA_METADATA_KEY not in header:
        raise ValueError(f"{file} has no LoRA config in its metadata, so it was not written by save_lora; "
                         "load it with the pipeline's load_lora_weights")
    prefix = family_of(unet).lora_prefix + "."
    saved = {k.removeprefix(prefix): v for k, v in json.loads(header[_LORA_METADATA_KEY]).items()
             if k.startswith(prefix)}

    config = _adapter_config(unet)
    if config is None:
        add_lora(unet, rank=saved["r"], alpha=saved["lora_alpha"], targets=tuple(saved["target_modules"]))
    elif (config.r, config.lora_alpha, set(config.target_modules)) != (
            saved["r"], saved["lora_alpha"], set(saved["target_modules"])):
        raise ValueError(f"the UNet's LoRA (rank {config.r}, alpha {config.lora_alpha}) does not match {file} "
                         f"(rank {saved['r']}, alpha {saved['lora_alpha']})")

    peft_state = convert_unet_state_dict_to_peft(
        {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
    result = set_peft_model_state_dict(unet, peft_state, adapter_name=_ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing or len(peft_state) == 0:
        raise ValueError(f"{file} does not fit this UNet's LoRA: unexpected keys {result.unexpected_keys[:3]}, "
                         f"missing keys {missing[:3]}")
    return unet
