"""Measured bytes and FLOPs by key: cached in rlr_fast/assets/plan_measurements.json for SD1.4 at
512 px and the sdxl preset, measured on demand (seconds on a CPU; minutes for SDXL) for anything else
and kept for the process.

Activation bytes of a UNet call grow linearly with its samples, so UNet phases are measured at
one and two samples and fitted; the decode is measured at (batch, decode_chunk) = (1, 1), (2, 1),
(2, 2) and fitted on both; the reward network at batch one and two. generate.py fills the cache and
checks the fits (and the way the decode and the network combine) against direct measurements further out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import architectures as arch
from .phases import forward_flops, measure_decode_phase, measure_reward_network, measure_unet_phase
from .measure import Measurement

MEASUREMENTS_FILE = Path(__file__).resolve().parent.parent / "assets" / "plan_measurements.json"


def _fit_linear(points: list[list[int]], n: int, column: int) -> int:
    """Value at n from rows [n, peak, saved] at two n (activations grow linearly)."""
    (n1, b1), (n2, b2) = [(p[0], p[column]) for p in points[:2]]
    return round(b1 + (n - n1) * (b2 - b1) / (n2 - n1))


def _fit_plane(points: list[list[int]], batch: int, chunk: int, column: int) -> int:
    """Value at (batch, chunk) from rows [batch, chunk, peak, saved] at (1, 1), (2, 1), (2, 2): the
    per-sample residue grows with the batch, the decoder's activations with the chunk decoded at once."""
    v11, v21, v22 = (p[column] for p in points[:3])
    return round(v11 + (batch - 1) * (v21 - v11) + (chunk - 1) * (v22 - v21))


def dtype_name(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "half"  # float16 and bfloat16 have the same bytes


class MeasurementTable:
    """Measured phase bytes, parameter bytes and FLOPs by key, loaded from a JSON file (None: empty)."""

    def __init__(self, path: Optional[Path] = MEASUREMENTS_FILE):
        self.path = path
        self.data: dict[str, Any] = {"entries": {}, "params": {}, "flops": {}}
        if path is not None and Path(path).is_file():
            self.data = json.loads(Path(path).read_text())
        self._modules: dict[tuple, nn.Module] = {}

    def _module(self, key: tuple, make: Callable[[], nn.Module]) -> nn.Module:
        if key not in self._modules:
            self._modules[key] = make()
        return self._modules[key]

    def unet(self, config: dict, dtype: torch.dtype, lora_rank: int) -> nn.Module:
        return self._module(("unet", json.dumps(config, sort_keys=True, default=str), dtype, lora_rank),
                            lambda: arch.meta_unet(config, dtype=dtype, lora_rank=lora_rank))

    def vae(self, config: dict, dtype: torch.dtype) -> nn.Module:
        return self._module(("vae", json.dumps(config, sort_keys=True, default=str), dtype),
                            lambda: arch.build("vae", config, dtype))

    def reward(self, reward, dtype: torch.dtype, checkpoint: bool) -> nn.Module:
        return self._module(("reward", arch.reward_id(reward), dtype, checkpoint),
                            lambda: arch.meta_reward(reward, dtype=dtype, checkpoint=checkpoint))

    def _entry(self, key: str, measure_points: Callable[[], list]) -> list:
        if key not in self.data["entries"]:
            self.data["entries"][key] = {"points": measure_points()}
        return self.data["entries"][key]["points"]

    # -- phases

    def unet_phase(self, unet_id: str, config: dict, samples: int, latent_hw, *, autocast: bool, attention: str,
                   lora_rank: int, cfg_mode: str, grad: str, checkpoint: bool, saved: bool = False) -> int:
        """Peak bytes (or, with `saved`, bytes saved for backward) of a UNet phase on `samples`."""
        checkpoint = checkpoint and grad != "none"
        dtype = torch.float16 if autocast else torch.float32
        key = (f"{unet_id}|{'x'.join(map(str, latent_hw))}|{'autocast' if autocast else 'float32'}|{attention}"
               f"|lora{lora_rank}|cfg={cfg_mode}|grad={grad}|ckpt={int(checkpoint)}")

        def points():
            unet = self.unet(config, dtype, lora_rank)
            rows = []
            for n in (1, 2):
                m = measure_unet_phase(unet, n, latent_hw, cfg_mode=cfg_mode, grad=grad, checkpoint=checkpoint,
                                       autocast=autocast, attention=attention)
                rows.append([n, m.peak_bytes, m.saved_bytes])
            return rows

        return _fit_linear(self._entry(key, points), samples, column=2 if saved else 1)

    def decode_phase(self, vae_id: str, config: dict, batch: int, decode_chunk: int, latent_hw, *,
                     dtype: torch.dtype, attention: str, grad: bool, checkpoint_vae: bool) -> Measurement:
        """The VAE's share of the reward phase (peak and bytes kept for its backward)."""
        checkpoint_vae = checkpoint_vae and grad
        key = (f"{vae_id}|{latent_hw[0]}x{latent_hw[1]}|{dtype_name(dtype)}|{attention}|grad={int(grad)}"
               f"|ckpt={int(checkpoint_vae)}")

        def points():
            vae = self.vae(config, dtype)
            rows = []
            for b, c in ((1, 1), (2, 1), (2, 2)):
                m = measure_decode_phase(vae, b, latent_hw, decode_chunk=c, checkpoint_vae=checkpoint_vae, grad=grad,
                                         autocast=dtype != torch.float32, attention=attention)
                rows.append([b, c, m.peak_bytes, m.saved_bytes])
            return rows

        rows = self._entry(key, points)
        chunk = min(decode_chunk, batch)
        return Measurement(_fit_plane(rows, batch, chunk, 2), _fit_plane(rows, batch, chunk, 3))

    def reward_network(self, reward, batch: int, image_hw, *, dtype: torch.dtype, attention: str, grad: bool,
                       checkpoint: bool) -> int:
        """Peak bytes of the reward network's forward (and backward) on `batch` images."""
        checkpoint = checkpoint and grad
        key = (f"reward:{arch.reward_id(reward)}|{image_hw[0]}x{image_hw[1]}|{dtype_name(dtype)}|{attention}"
               f"|grad={int(grad)}|ckpt={int(checkpoint)}")

        def points():
            module = self.reward(reward, dtype, checkpoint)
            return [[b, measure_reward_network(module, b, image_hw, grad=grad, attention=attention).peak_bytes, 0]
                    for b in (1, 2)]

        return _fit_linear(self._entry(key, points), batch, column=1)

    # -- parameters and FLOPs

    def param_bytes(self, key: str, tensors: Callable[[], Sequence[torch.Tensor]]) -> int:
        if key not in self.data["params"]:
            self.data["params"][key] = arch.module_bytes(tensors())
        return self.data["params"][key]

    def flops(self, key: str, module: Callable[[], nn.Module], part: str, latent_hw, image_hw=None) -> int:
        """FLOPs of one sample's forward of `part` (see phases.forward_flops)."""
        if key not in self.data["flops"]:
            self.data["flops"][key] = forward_flops(module(), part, latent_hw, image_hw)
        return self.data["flops"][key]

    def save(self, path: Optional[Path] = None) -> Path:
        import diffusers
        import transformers

        path = Path(path or self.path)
        self.data["generated_by"] = "python -m rlr_fast.plan --measure"
        self.data["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                 "transformers": transformers.__version__}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        return path


_DEFAULT_TABLE: Optional[MeasurementTable] = None


def default_table() -> MeasurementTable:
    """The process-wide table, loaded from rlr_fast/assets/plan_measurements.json."""
    global _DEFAULT_TABLE
    if _DEFAULT_TABLE is None:
        _DEFAULT_TABLE = MeasurementTable()
    return _DEFAULT_TABLE
