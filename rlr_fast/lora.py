"""LoRA adapters on a diffusers UNet, in the formats diffusers reads.

`add_lora` puts peft LoRA layers on the attention projections (diffusers' native route, or peft's
injection for UNets without the mixin); `save_lora` writes `pytorch_lora_weights.safetensors`, which
the model family's pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, ...:
rlr_fast.families) reads with `load_lora_weights`, with the exact alpha / rank in its metadata and a
checksum of its weights and settings; `load_lora` reads it back (verifying the checksum when there
is one: a file of another trainer has none); `lora_disabled` runs the base model without a second
copy of its weights. Equal weights give equal bytes, in any process.
Imports only torch, diffusers, peft, safetensors, rlr_fast.run_dir and rlr_fast.families.
"""

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Optional

import diffusers
import safetensors
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from .families import family_of
from .run_dir import atomic_write

__all__ = ["add_lora", "save_lora", "load_lora", "read_lora", "lora_step", "has_lora", "lora_disabled",
           "lora_parameters", "LORA_WEIGHT_NAME"]

# The file name a diffusers pipeline's `load_lora_weights(dir)` looks for first.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers' default adapter name (`ModelMixin.add_adapter`); we keep one adapter per UNet.
_ADAPTER = "default"
# Where diffusers stores the peft LoraConfig inside the safetensors header (its entries, like the
# weights', prefixed with the network's component name: the family's lora_prefix).
_LORA_METADATA_KEY = "lora_adapter_metadata"
# Our metadata keys: the BLAKE2b checksum of the weights and the adapter metadata, and the training
# step the weights are of.
_CHECKSUM_KEY, _STEP_KEY = "rlr_fast_checksum", "rlr_fast_step"


def add_lora(unet: UNet2DConditionModel, rank: int = 4, alpha: float = 4,
             targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
             seed: int | None = None) -> UNet2DConditionModel:
    """Add a LoRA adapter to the UNet's attention projections, in place; returns the UNet.

    Uses `unet.add_adapter(LoraConfig(...))`, the diffusers-native route, so the adapter saves in
    the format the pipelines' `load_lora_weights` reads. The base weights are frozen; only
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


def _checksum(weights: dict[str, torch.Tensor], adapter_metadata: str, step: Optional[str]) -> str:
    """BLAKE2b of the adapter metadata, the step and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(f"{adapter_metadata}\n{step}".encode(), digest_size=16)
    for name in sorted(weights):
        tensor = weights[name]
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_lora(unet: UNet2DConditionModel, directory: str | Path, step: Optional[int] = None) -> Path:
    """Save the UNet's LoRA as `directory/pytorch_lora_weights.safetensors`; returns the file path.

    diffusers format (keys `unet.<module>.lora.down/up.weight`, the peft LoraConfig in the
    safetensors metadata, as the model family's pipeline's `save_lora_weights` writes them:
    rlr_fast.families), so its `load_lora_weights(directory)` (`StableDiffusionXLPipeline`'s for SDXL)
    restores the exact scaling alpha / rank (without it, diffusers would assume alpha = rank); plus a
    checksum that `load_lora` verifies and the training `step` when given. Written atomically: a crash
    leaves the old file or the new one.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_lora needs a directory, but {directory} is a file")
    config = _adapter_config(unet)
    if config is None:
        raise ValueError("the UNet has no LoRA adapter to save; call add_lora first")
    peft_state = get_peft_model_state_dict(unet, adapter_name=_ADAPTER)
    family = family_of(unet)
    weights = getattr(diffusers, family.lora_pipeline).pack_weights(
        {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(peft_state).items()},
        family.lora_prefix)
    # sets (target_modules) as sorted lists: a set's order changes with the process's hash seed
    adapter = {f"{family.lora_prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    metadata = {"format": "pt", _LORA_METADATA_KEY: json.dumps(adapter, indent=2, sort_keys=True)}
    if step is not None:
        metadata[_STEP_KEY] = str(step)
    metadata[_CHECKSUM_KEY] = _checksum(weights, metadata[_LORA_METADATA_KEY], metadata.get(_STEP_KEY))
    data = _sorted_header(safetensors.torch.save(weights, metadata=metadata))
    return atomic_write(directory / LORA_WEIGHT_NAME, lambda tmp: tmp.write_bytes(data))


def _sorted_header(data: bytes) -> bytes:
    """A safetensors file's bytes with its JSON header's keys sorted: safetensors writes the metadata
    in hash order (a Rust HashMap), so equal LoRAs would differ in bytes from process to process."""
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces
    return len(header).to_bytes(8, "little") + header + data[8 + length:]


def read_lora(file: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights and metadata of a LoRA file, its checksum verified when it has one; a ValueError
    saying what is wrong otherwise (a foreign LoRA, without our checksum, is read as it is)."""
    file = Path(file)
    try:
        with safetensors.safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # e.g. a pickle under the safetensors name
        raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if _CHECKSUM_KEY in header and header[_CHECKSUM_KEY] != _checksum(
            weights, header.get(_LORA_METADATA_KEY, ""), header.get(_STEP_KEY)):
        raise ValueError(f"{file} is damaged: its weights do not match the checksum written with them (a flipped bit, "
                         "or a partial copy); use a checkpoint of its run (--lora RUN/checkpoints/step_N.safetensors) "
                         "or resume the run (rlr-fast finetune --resume RUN) to write it again")
    return weights, header


def lora_step(file: str | Path) -> Optional[int]:
    """The training step `save_lora` recorded in a LoRA file (None: none recorded); the file verified."""
    step = read_lora(file)[1].get(_STEP_KEY)
    return None if step is None else int(step)


def load_lora(unet: UNet2DConditionModel, directory: str | Path) -> UNet2DConditionModel:
    """Load a LoRA written by `save_lora` into the UNet, in place, its checksum verified; returns the UNet.

    Adds the adapter (with the saved rank, alpha and targets) if the UNet has none; if it has one,
    its weights are overwritten in place, so an optimizer holding them stays valid. For LoRA files
    from other trainers use the pipeline's `load_lora_weights`.
    """
    file = Path(directory) / LORA_WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {file} (save_lora writes {LORA_WEIGHT_NAME} into its directory)")
    weights, header = read_lora(file)
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
