"""The memory planner: fit one update into a memory budget with the least recomputation.

    p = rlr_fast.plan({"batch_size": 2, "num_steps": 50, "guidance_scale": 7.5, "h": 4}, max_memory_gb=6)
    p.options           # max_batch, checkpoint_unet, checkpoint_vae, decode_chunk, split_cfg, free_text_encoder
    p.peak_bytes        # estimated peak tensor bytes of one update
    p.breakdown         # what is alive at the peak, by part; sums to peak_bytes
    print(p.table())

Where the bytes come from: MEASUREMENT, not a hand-written model. The real architectures
(SD1.4's UNet, VAE and a CLIP-L/14 aesthetic reward, or the UNet you pass) run forward and backward
on the meta device, through rlr_fast's own code paths (`rollout.recompute_steps` as the sweeps
call it, `rewards.latent.LatentReward` as training calls it), with no memory and no weights:

* `LiveBytes`, a dispatch mode, sees every tensor an op creates and frees it when its storage dies;
  its running maximum is what `torch.cuda.max_memory_allocated` would report for those tensors
  (activations, saved tensors, gradients, temporaries; parameters and inputs made before the
  measurement are excluded). Allocator rounding, the CUDA context and cuDNN workspaces are not
  tensors and are not counted.
* `saved_tensors_hooks` count the bytes autograd saves for backward, deduplicated by storage
  (`Measurement.saved_bytes`); `tests/test_plan.py` checks this count against real tensors on a CPU.

Two things a meta run does differently from a GPU, and how they are put right (`gpu_like_execution`):
* Attention: scaled_dot_product_attention on meta picks the MATH path, which saves the
  (batch, heads, tokens, tokens) softmax (~2.8 GiB for one SD1.4 step at batch 2 in fp16). A GPU
  runs flash / memory-efficient attention, which saves q, k, v, the output and a float32
  log-sum-exp per query. With attention="flash" (the default) every SDPA call is routed to
  `aten._scaled_dot_product_flash_attention_for_cpu`, whose autograd saves exactly that set, on
  meta. attention="math" keeps the MATH path (a GPU where SDPA cannot use a fused kernel).
* Mixed precision: training runs fp16 weights under CUDA autocast (train.py), which meta tensors
  cannot enter. precision="autocast" emulates CUDA autocast's casts for the ops these models use:
  linear / conv / matmul / attention in float16, group_norm / layer_norm / softmax in float32
  (their outputs stay float32, as on a GPU). precision="half" runs plain fp16 without autocast.

Activation bytes grow linearly with the number of samples, so each phase is measured at two or
three batch sizes and fitted; `generate_measurements()` checks the fit at a further point. The
SD1.4 measurements at 512 px are cached in rlr_fast/assets/plan_measurements.json; regenerate it
(a few minutes on a CPU) after changing a measured code path or the dependencies:

    python -m rlr_fast.plan --measure

Anything else (another resolution, precision, attention, LoRA rank or UNet) is measured when first
asked for and kept for the process.

The update's phases (never alive together, memory_budget.md): rollout (no grad); the reward phase
(dR/dx0 through VAE decode + reward, `decode_chunk` samples per decode); the model sweep (one
recomputed pathwise step at a time, likelihood-ratio steps `max_batch` samples per call). The
peak is the resident bytes (weights, LoRA + AdamW state, the stored trajectory) plus the largest
phase.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
MEASUREMENTS_FILE = Path(__file__).parent / "assets" / "plan_measurements.json"
OPTION_NAMES = ("max_batch", "checkpoint_unet", "checkpoint_vae", "decode_chunk", "split_cfg", "free_text_encoder")
PRECISIONS = ("autocast", "half", "float32")
ATTENTIONS = ("flash", "math")
REWARDS = ("aesthetic", "pixels")
METHODS = ("rlr", "full_bp", "truncated_bp", "zo", "ddpo")
# Tokens of a CLIP text embedding (SD1.x prompts are padded to 77).
PROMPT_TOKENS = 77
# AdamW keeps two float32 moments per trainable value; the gradient is a third copy.
ADAMW_STATE_PER_PARAM = 2


# ==============================================================================================
# Measuring on the meta device


@dataclass(frozen=True)
class Measurement:
    """Bytes of one measured phase."""

    peak_bytes: int  # running maximum of live tensor bytes created inside the phase
    saved_bytes: int  # bytes saved for backward by the outermost autograd graph (0 without grad)


class LiveBytes(TorchDispatchMode):
    """Running total and maximum of the bytes of tensor storages created while active.

    Storages of `existing` tensors (parameters, inputs; they must stay alive throughout) are never
    counted, nor are views of them. A storage is released when its last tensor dies (a weakref
    finalizer on the storage object, which PyTorch keeps alive exactly as long as the storage).
    """

    def __init__(self, existing: Sequence[torch.Tensor] = ()):
        super().__init__()
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self.created: set[int] = set()  # storage ids created inside and still alive
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.created or key in self._existing:
            return
        self.created.add(key)
        nbytes = storage.nbytes()
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self.created.discard(key)
        self.current -= nbytes



@contextlib.contextmanager
def count_saved_bytes(live: LiveBytes) -> Iterator[list[int]]:
    """Bytes autograd saves for backward in the outermost graph: storages created inside `live`,
    each counted once however many ops save it. Yields a one-element list holding the total."""
    total = [0]
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key in live.created and key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


# The torch.nn.functional entry points CUDA autocast casts to float16 / float32 (from torch's
# autocast op lists), restricted to those Stable Diffusion's UNet and VAE and CLIP call. Modules
# look these up on `F` at call time, so replacing the attributes reaches every call.
_AUTOCAST_HALF = ("linear", "conv2d", "scaled_dot_product_attention")
_AUTOCAST_FLOAT = ("group_norm", "layer_norm", "softmax", "log_softmax")


def _cast_floats(args, kwargs, dtype: torch.dtype):
    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x
    return [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}


def _with_casts(fn: Callable, dtype: torch.dtype) -> Callable:
    def cast_then_call(*args, **kwargs):
        args, kwargs = _cast_floats(args, kwargs, dtype)
        return fn(*args, **kwargs)
    return cast_then_call


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
    if attn_mask is not None or extra:
        raise NotImplementedError("the planner models flash attention without a mask (Stable Diffusion passes "
                                  "none); measure with attention='math' for masked attention")
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale)[0]


def _math_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra)[0]


@contextlib.contextmanager
def gpu_like_execution(attention: str = "flash", precision: str = "autocast") -> Iterator[None]:
    """Make a run save what the same run saves on a GPU (see the module docstring): SDPA as flash
    attention ("flash") or its MATH path ("math"), and CUDA autocast's casts (precision="autocast").

    It replaces functions of torch.nn.functional for the duration (a mode would not reach the
    recomputation inside a checkpointed backward): not thread-safe, measurement only.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    replaced = {"scaled_dot_product_attention": _flash_attention if attention == "flash" else _math_attention}
    if precision == "autocast":
        for name in _AUTOCAST_HALF:
            replaced[name] = _with_casts(replaced.get(name, getattr(F, name)), torch.float16)
        for name in _AUTOCAST_FLOAT:
            replaced[name] = _with_casts(getattr(F, name), torch.float32)
    original = {name: getattr(F, name) for name in replaced}
    try:
        for name, fn in replaced.items():
            setattr(F, name, fn)
        yield
    finally:
        for name, fn in original.items():
            setattr(F, name, fn)


def measure(run: Callable[[], Any], *, existing: Sequence[torch.Tensor] = (), attention: str = "flash",
            precision: str = "autocast") -> Measurement:
    """Peak live bytes and saved-for-backward bytes of `run()`, excluding the storages of `existing`
    (parameters, buffers, inputs). Works on real tensors too (tests compare)."""
    live = LiveBytes(existing)
    with gpu_like_execution(attention, precision), live, count_saved_bytes(live) as saved:
        run()
    return Measurement(peak_bytes=live.peak, saved_bytes=saved[0])


def count_flops(run: Callable[[], Any]) -> int:
    """Floating-point operations of `run()` (torch.utils.flop_counter; works on meta)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())


# ==============================================================================================
# The measured phases, on rlr_fast's own code paths


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warning about casting whole models with .to(dtype) (we mean it)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _module_state(module: nn.Module) -> list[torch.Tensor]:
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors + [p.grad for p in module.parameters() if p.grad is not None]


@contextlib.contextmanager
def _gradient_checkpointing(module: nn.Module, enabled: bool):
    """diffusers' per-block checkpointing for the duration (how estimate(checkpoint=True) runs)."""
    was = bool(getattr(module, "is_gradient_checkpointing", False))
    if enabled and not was:
        module.enable_gradient_checkpointing()
    elif was and not enabled:
        module.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was != enabled:
            module.enable_gradient_checkpointing() if was else module.disable_gradient_checkpointing()


def meta_unet(model: Union[str, dict, nn.Module] = "sd14", *, dtype: torch.dtype = torch.float16,
              lora_rank: Optional[int] = 4) -> nn.Module:
    """The UNet on meta, weights in `dtype`, with float32 LoRA (as train.py makes it).

    `model`: "sd14", a UNet2DConditionModel config dict, or a UNet2DConditionModel (its config is
    rebuilt on meta; the module itself is not touched).
    """
    from diffusers import UNet2DConditionModel

    from .models import add_lora, build_sd14_on_meta

    with _quiet_diffusers():
        if isinstance(model, str):
            if model != "sd14":
                raise ValueError(f"model must be 'sd14', a UNet2DConditionModel or its config dict; got {model!r}")
            unet = build_sd14_on_meta(("unet",))["unet"]
        elif isinstance(model, dict):  # constructor kwargs or a saved config (from_config skips "_" keys)
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(model)
        elif isinstance(model, UNet2DConditionModel):
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(model.config)
        else:
            raise TypeError(f"model must be 'sd14', a UNet2DConditionModel or its config dict, "
                            f"got {type(model).__name__}")
        unet = unet.to(dtype).eval().requires_grad_(False)
    if lora_rank:
        add_lora(unet, rank=lora_rank, alpha=lora_rank)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
                p.grad = torch.zeros_like(p)  # accumulate in place: the .grad is optimizer state
    return unet


def _meta_trajectory(batch: int, latent_hw: tuple[int, int], channels: int, cond_dim: int, *,
                     cfg: bool, latent_dtype: torch.dtype, cond_dtype: torch.dtype):
    from .rollout import Trajectory

    def empty(*shape, dtype=latent_dtype):
        return torch.empty(shape, device="meta", dtype=dtype)

    shape = (batch, channels) + tuple(latent_hw)
    return Trajectory(
        latents=empty(2, *shape), noises=empty(1, *shape), timesteps=empty(1, dtype=torch.int64),
        sigmas=empty(1, dtype=torch.float64), c_x=empty(1, dtype=torch.float64), c_e=empty(1, dtype=torch.float64),
        log_probs=empty(1, batch), eta=1.0, encoder_hidden_states=empty(batch, PROMPT_TOKENS, cond_dim, dtype=cond_dtype),
        negative_encoder_hidden_states=empty(batch, PROMPT_TOKENS, cond_dim, dtype=cond_dtype) if cfg else None,
        guidance_scale=7.5 if cfg else 1.0)


def measure_unet_phase(unet: nn.Module, samples: int, latent_hw: tuple[int, int], *, cfg_mode: str, grad: str,
                       checkpoint: bool, precision: str = "autocast", attention: str = "flash") -> Measurement:
    """One recomputed step on `samples` trajectory samples, as the sweeps run it.

    grad: "input" (a pathwise step: gradient for the step's input and the LoRA), "params" (a
    likelihood-ratio chunk: LoRA gradient only) or "none" (a rollout step, no grad).
    cfg_mode: "none", "together" (one UNet call on 2 x samples) or "split" (two calls).
    """
    from .rollout import recompute_steps

    if cfg_mode not in ("none", "together", "split"):
        raise ValueError(f"cfg_mode must be 'none', 'together' or 'split', got {cfg_mode!r}")
    if grad not in ("input", "params", "none"):
        raise ValueError(f"grad must be 'input', 'params' or 'none', got {grad!r}")
    weight_dtype = next(p.dtype for p in unet.parameters() if not p.requires_grad)
    latent_dtype = torch.float32 if precision != "half" else torch.float16  # train.py draws x_T in fp32
    traj = _meta_trajectory(samples, latent_hw, unet.config.in_channels, unet.config.cross_attention_dim,
                            cfg=cfg_mode != "none", latent_dtype=latent_dtype, cond_dtype=weight_dtype)
    cotangent = torch.empty_like(traj.latents[0])
    sample = traj.latents[:1].detach().requires_grad_(grad == "input")
    existing = _module_state(unet) + [cotangent, sample] + [v for v in vars(traj).values() if torch.is_tensor(v)]

    def run():
        with torch.set_grad_enabled(grad != "none"):
            mean = recompute_steps(unet, traj, [0], sample if grad == "input" else None,
                                   split_cfg=cfg_mode == "split", backend="reference")
            if grad != "none":
                torch.autograd.backward(mean, cotangent.unsqueeze(0))

    with _gradient_checkpointing(unet, checkpoint and grad != "none"):
        return measure(run, existing=existing, attention=attention, precision=precision)


class AestheticArchitecture(nn.Module):
    """The LAION aesthetic reward's network (CLIP ViT-L/14 vision tower with projection + MLP head)
    without its weights: the same computation as rewards.clip_models.LaionAesthetic.score, for
    measuring and for random-weight benchmarks. Call as reward(images, prompts)."""

    differentiable = True

    def __init__(self):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from .rewards.clip_models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreferenceHead

        # openai/clip-vit-large-patch14's vision config
        config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
        self.vision = CLIPVisionModelWithProjection(config)
        self.head = PreferenceHead(config.projection_dim)
        self.image_size = config.image_size
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from .rewards.clip_models import preprocess

        dtype = next(self.vision.parameters()).dtype
        pixels = preprocess(images.to(dtype), self.image_size, self.mean, self.std)
        embedding = F.normalize(self.vision(pixel_values=pixels).image_embeds.float(), dim=-1)
        return self.head(embedding)


class PixelReward(nn.Module):
    """A reward computed from the decoded pixels without a network (colour, brightness...)."""

    differentiable = True

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


def _as_unchecked_reward(module: nn.Module):
    """The module as an rlr_fast Reward whose call skips the value-range checks (which read values,
    impossible on meta)."""
    from .rewards import Reward

    class Unchecked(Reward):
        differentiable = bool(getattr(module, "differentiable", True))

        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, images, prompts):
            return self.inner(images, prompts)

    return Unchecked()


def meta_reward_models(reward: Union[str, nn.Module] = "aesthetic", *, dtype: torch.dtype = torch.float16):
    """(vae, reward module) on meta: SD1.4's VAE and the reward's network in `dtype`."""
    from .models import build_sd14_on_meta

    with _quiet_diffusers():
        vae = build_sd14_on_meta(("vae",))["vae"].to(dtype)
    if reward == "aesthetic":
        with torch.device("meta"):
            module = AestheticArchitecture()
        module = module.to(dtype)
    elif reward == "pixels":
        module = PixelReward()
    elif isinstance(reward, nn.Module):
        module = reward
    else:
        raise ValueError(f"reward must be one of {REWARDS} or an nn.Module reward(images, prompts) on the meta "
                         f"device; got {reward!r}")
    return vae, module


def measure_reward_phase(vae: nn.Module, reward: nn.Module, batch: int, latent_hw: tuple[int, int], *,
                         decode_chunk: int, checkpoint_vae: bool, grad: bool, precision: str = "autocast",
                         attention: str = "flash") -> Measurement:
    """R(x0) and, with `grad`, dR/dx0 of a batch, through rewards.latent.LatentReward as training runs it."""
    from .rewards.latent import LatentReward

    latent_fn = LatentReward(vae, _as_unchecked_reward(reward), ["a prompt"] * batch, decode_chunk=decode_chunk,
                             checkpoint_vae=checkpoint_vae)
    latent_dtype = torch.float32 if precision != "half" else torch.float16
    x0 = torch.empty((batch, vae.config.latent_channels) + tuple(latent_hw), device="meta", dtype=latent_dtype)
    x0.requires_grad_(grad)
    existing = _module_state(vae) + _module_state(reward) + [x0]

    def run():
        with torch.set_grad_enabled(grad):
            r = latent_fn(x0)
            if grad:
                torch.autograd.grad(r.sum(), x0)

    return measure(run, existing=existing, attention=attention, precision=precision)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage once)."""
    seen: dict[int, int] = {}
    for t in _module_state(module):
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ==============================================================================================
# The measurement table: cached for SD1.4 at 512 px, measured on demand otherwise


def _fit_linear(points: list[list[int]], n: int, column: int = 1) -> int:
    """Bytes at n samples from measurements at 1 and 2 samples (activations grow linearly).
    Rows are [samples, peak_bytes, saved_bytes]; `column` picks peak (1) or saved (2)."""
    (n1, b1), (n2, b2) = [(p[0], p[column]) for p in points[:2]]
    return round(b1 + (n - n1) * (b2 - b1) / (n2 - n1))


def _fit_plane(points: list[list[int]], batch: int, chunk: int) -> int:
    """Bytes of the reward phase at (batch, decode_chunk) from measurements at (1, 1), (2, 1), (2, 2):
    the reward network's share grows with the batch, the decoder's with the chunk decoded at once."""
    b11, b21, b22 = (p[2] for p in points[:3])
    return round(b11 + (batch - 1) * (b21 - b11) + (chunk - 1) * (b22 - b21))


class MeasurementTable:
    """Measured phase bytes by key, loaded from the JSON cache and measured on a miss."""

    def __init__(self, path: Optional[Path] = MEASUREMENTS_FILE):
        self.path = path
        self.data: dict[str, Any] = {"entries": {}, "params": {}, "flops": {}}
        if path is not None and Path(path).is_file():
            self.data = json.loads(Path(path).read_text())
        self._modules: dict[str, nn.Module] = {}

    # -- the modules, built on meta only when a measurement is missing

    def _unet(self, model, precision: str, lora_rank: int) -> nn.Module:
        key = f"unet|{_model_id(model)}|{precision}|lora{lora_rank}"
        if key not in self._modules:
            self._modules[key] = meta_unet(model, dtype=_weight_dtype(precision), lora_rank=lora_rank)
        return self._modules[key]

    def _reward_models(self, reward, precision: str):
        key = f"reward|{_reward_id(reward)}|{precision}"
        if key not in self._modules:
            self._modules[key] = meta_reward_models(reward, dtype=_weight_dtype(precision))
        return self._modules[key]

    # -- phases

    def unet_phase(self, model, samples: int, latent_hw, *, precision: str, attention: str, lora_rank: int,
                   cfg_mode: str, grad: str, checkpoint: bool, saved: bool = False) -> int:
        """Peak bytes (or, with `saved`, bytes saved for backward) of one recomputed step on `samples`."""
        checkpoint = checkpoint and grad != "none"
        key = (f"unet|{_model_id(model)}|{latent_hw[0]}x{latent_hw[1]}|{precision}|{attention}|lora{lora_rank}"
               f"|cfg={cfg_mode}|grad={grad}|ckpt={int(checkpoint)}")
        entry = self.data["entries"].get(key)
        if entry is None:
            unet = self._unet(model, precision, lora_rank)
            points = []
            for n in (1, 2):
                m = measure_unet_phase(unet, n, latent_hw, cfg_mode=cfg_mode, grad=grad, checkpoint=checkpoint,
                                       precision=precision, attention=attention)
                points.append([n, m.peak_bytes, m.saved_bytes])
            entry = self.data["entries"][key] = {"points": points}
        return _fit_linear(entry["points"], samples, column=2 if saved else 1)

    def reward_phase(self, reward, batch: int, decode_chunk: int, latent_hw, *, precision: str, attention: str,
                     grad: bool, checkpoint_vae: bool) -> int:
        checkpoint_vae = checkpoint_vae and grad
        key = (f"vae+reward|{_reward_id(reward)}|{latent_hw[0]}x{latent_hw[1]}|{precision}|{attention}"
               f"|grad={int(grad)}|ckpt={int(checkpoint_vae)}")
        entry = self.data["entries"].get(key)
        if entry is None:
            vae, module = self._reward_models(reward, precision)
            points = []
            for b, c in ((1, 1), (2, 1), (2, 2)):
                m = measure_reward_phase(vae, module, b, latent_hw, decode_chunk=c, checkpoint_vae=checkpoint_vae,
                                         grad=grad, precision=precision, attention=attention)
                points.append([b, c, m.peak_bytes, m.saved_bytes])
            entry = self.data["entries"][key] = {"points": points}
        return _fit_plane(entry["points"], batch, min(decode_chunk, batch))

    # -- parameters and FLOPs

    def param_bytes(self, part: str, model, reward, precision: str, lora_rank: int) -> int:
        """Bytes of the weights of `part`: unet (frozen), lora, vae, text_encoder or reward."""
        ident = {"unet": _model_id(model), "lora": f"{_model_id(model)}|lora{lora_rank}",
                 "reward": _reward_id(reward)}.get(part, "sd14")
        key = f"{part}|{ident}|{precision}"
        if key not in self.data["params"]:
            if part in ("unet", "lora"):
                unet = self._unet(model, precision, lora_rank)
                lora = [p for p in unet.parameters() if p.requires_grad]
                frozen = [p for p in unet.parameters() if not p.requires_grad] + list(unet.buffers())
                value = sum(t.nbytes for t in (lora if part == "lora" else frozen))
            elif part == "text_encoder":
                from .models import build_sd14_on_meta
                value = module_bytes(build_sd14_on_meta(("text_encoder",))["text_encoder"].to(_weight_dtype(precision)))
            else:
                vae, module = self._reward_models(reward, precision)
                value = module_bytes(vae if part == "vae" else module)
            self.data["params"][key] = value
        return self.data["params"][key]

    def flops(self, part: str, model, latent_hw) -> int:
        """FLOPs of one sample's forward: "unet" (one step) or "vae_decode"."""
        if part not in ("unet", "vae_decode"):
            raise ValueError(f"flops are measured for 'unet' and 'vae_decode', not {part!r}")
        ident = _model_id(model) if part == "unet" else "sd14"
        key = f"{part}|{ident}|{latent_hw[0]}x{latent_hw[1]}"
        if key not in self.data["flops"]:
            self.data["flops"][key] = _measure_forward_flops(self, part, model, latent_hw)
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


def _measure_forward_flops(table: MeasurementTable, part: str, model, latent_hw) -> int:
    with torch.no_grad():
        if part == "unet":
            unet = table._unet(model, "float32", 0)
            x = torch.empty((1, unet.config.in_channels) + tuple(latent_hw), device="meta")
            cond = torch.empty((1, PROMPT_TOKENS, unet.config.cross_attention_dim), device="meta")
            return count_flops(lambda: unet(x, torch.empty((1,), device="meta", dtype=torch.int64),
                                            encoder_hidden_states=cond))
        vae, _ = table._reward_models("pixels", "float32")
        z = torch.empty((1, vae.config.latent_channels) + tuple(latent_hw), device="meta")
        return count_flops(lambda: vae.decode(z))


def _weight_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "float32" else torch.float16


def _model_id(model) -> str:
    if isinstance(model, str):
        return model
    from .rollout import model_key

    if isinstance(model, dict):
        return "config:" + json.dumps({k: v for k, v in model.items() if not k.startswith("_")}, sort_keys=True,
                                      default=str)
    return "unet:" + model_key(model)


def _reward_id(reward) -> str:
    if isinstance(reward, str):
        return reward
    from .rollout import model_key

    return f"module:{type(reward).__name__}:{model_key(reward)}"


_DEFAULT_TABLE: Optional[MeasurementTable] = None


def default_table() -> MeasurementTable:
    """The process-wide table, loaded from rlr_fast/assets/plan_measurements.json."""
    global _DEFAULT_TABLE
    if _DEFAULT_TABLE is None:
        _DEFAULT_TABLE = MeasurementTable()
    return _DEFAULT_TABLE


# ==============================================================================================
# Planning


@dataclass
class PlanConfig:
    """What one update looks like, for the planner. Field names follow rlr_fast.config.Config."""

    model: Union[str, dict, nn.Module] = "sd14"  # "sd14", a UNet2DConditionModel or its config dict
    resolution: Optional[Union[int, tuple[int, int]]] = None  # image pixels; None: the UNet's sample_size * 8
    batch_size: int = 2
    num_steps: int = 50
    guidance_scale: float = 7.5  # classifier-free guidance is on unless this is 1
    method: str = "rlr"
    first_order_steps: int = 1  # rlr: f
    h: int = 2  # rlr: length of the half-order sub-chain
    zo_steps: Optional[int] = None  # rlr / zo: likelihood-ratio steps used (None: all of them)
    truncated_bp_k: int = 1  # truncated_bp: steps back-propagated
    lora_rank: int = 4
    precision: str = "autocast"  # "autocast" (fp16 weights under CUDA autocast, as train.py runs), "half", "float32"
    attention: str = "flash"  # "flash" (SDPA's fused kernels on a GPU) or "math"
    reward: Union[str, nn.Module] = "aesthetic"  # "aesthetic", "pixels", or a reward module built on meta
    max_memory_gb: Optional[float] = None  # GiB (2**30 bytes) of tensors; None: no limit

    def __post_init__(self):
        for name in ("batch_size", "num_steps", "lora_rank", "truncated_bp_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("first_order_steps", "h"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if isinstance(self.reward, str) and self.reward not in REWARDS:
            raise ValueError(f"the planner knows the rewards {REWARDS} (or takes a reward module built on the meta "
                             f"device); got {self.reward!r}")
        if isinstance(self.reward, nn.Module) and any(t.device.type != "meta" for t in _module_state(self.reward)):
            raise ValueError("a reward module for the planner must be built on the meta device "
                             "(`with torch.device('meta'): reward = MyReward()`), so no weights are needed")
        if self.method == "rlr" and self.first_order_steps + self.h > self.num_steps:
            raise ValueError(f"first_order_steps + h = {self.first_order_steps} + {self.h} exceeds num_steps = "
                             f"{self.num_steps}")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise ValueError(f"max_memory_gb must be > 0 or None, got {self.max_memory_gb!r}")

    @property
    def cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def latent_hw(self, vae_scale: int = 8) -> tuple[int, int]:
        """Latent (height, width): the image resolution over the VAE's downsampling factor."""
        if self.resolution is None:
            size = _unet_sample_size(self.model)
            return (size, size)
        hw = (self.resolution, self.resolution) if isinstance(self.resolution, int) else tuple(self.resolution)
        if len(hw) != 2 or any(not isinstance(v, int) or v <= 0 or v % vae_scale for v in hw):
            raise ValueError(f"resolution must be pixels divisible by {vae_scale} (an int or (height, width)), "
                             f"got {self.resolution!r}")
        return (hw[0] // vae_scale, hw[1] // vae_scale)

    @classmethod
    def from_any(cls, source: Union[None, dict, "PlanConfig", Any] = None, **overrides) -> "PlanConfig":
        """From a dict (unknown keys are an error), a PlanConfig, or any object with some of these
        attribute names (e.g. rlr_fast.config.Config; its dtype becomes `precision`)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if source is None:
            values = {}
        elif isinstance(source, cls):
            values = dataclasses.asdict(source) | {"model": source.model, "reward": source.reward}
        elif isinstance(source, dict):
            values = dict(source)
        else:
            values = {n: getattr(source, n) for n in names if hasattr(source, n)}
            dtype = getattr(source, "dtype", None)
            if dtype is not None and "precision" not in values:
                values["precision"] = "float32" if str(dtype) in ("float32", "torch.float32") else "autocast"
        values.update(overrides)
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            raise ValueError("unknown plan setting(s) " + ", ".join(
                f"{k!r}" + (f" (did you mean {hints[k][0]!r}?)" if hints[k] else "") for k in unknown)
                + f"; the settings are {names}")
        return cls(**values)


def _unet_sample_size(model) -> int:
    if isinstance(model, str):
        from .models import sd14_config
        return sd14_config()["unet"]["sample_size"]
    config = model if isinstance(model, dict) else model.config
    size = config.get("sample_size") if isinstance(config, dict) else config.sample_size
    if not isinstance(size, int):
        raise ValueError(f"the UNet's sample_size is {size!r}; pass resolution= (pixels) to the planner")
    return size


@dataclass
class StepCounts:
    """How many steps of each kind one update recomputes (rlr_math.md sections 3 and 5)."""

    pathwise: int  # recomputed one at a time with an input gradient
    likelihood_ratio: int  # batched into chunks, parameter gradient only
    reward_grad: bool  # whether dR/dx0 is needed (a first-order term exists)


def step_counts(cfg: PlanConfig) -> StepCounts:
    T = cfg.num_steps
    if cfg.method == "rlr":
        rest = T - cfg.first_order_steps - cfg.h
        zo = rest if cfg.zo_steps is None else min(cfg.zo_steps, rest)
        return StepCounts(cfg.first_order_steps + cfg.h, zo, cfg.first_order_steps > 0)
    if cfg.method == "full_bp":
        return StepCounts(T, 0, True)
    if cfg.method == "truncated_bp":
        return StepCounts(min(cfg.truncated_bp_k, T), 0, True)
    zo = T if cfg.zo_steps is None else min(cfg.zo_steps, T)  # zo (eta > 0: no deterministic step) and ddpo
    return StepCounts(0, zo, False)


class PlanError(ValueError):
    """No choice of the memory options fits the budget; `smallest` is the plan with the least peak."""

    def __init__(self, message: str, smallest: "Plan"):
        super().__init__(message)
        self.smallest = smallest


@dataclass
class Plan:
    """The chosen memory options of one update and its estimated peak."""

    config: PlanConfig
    options: dict  # OPTION_NAMES -> value; Config field names, so `cfg.with_overrides(plan.options)` applies them
    peak_bytes: int
    breakdown: dict  # part -> bytes alive at the peak; sums to peak_bytes
    phases: dict  # every phase's activation bytes (only the largest is alive at the peak)
    peak_phase: str
    extra_flops: int  # forward FLOPs recomputed because of checkpointing
    model_calls: int  # UNet + VAE calls of one update
    notes: list = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.config.max_memory_gb is None or self.peak_bytes <= self.config.max_memory_gb * GIB

    def estimate_kwargs(self) -> dict:
        """The options under the names `rlr_fast.estimate` takes."""
        return {"max_batch": self.options["max_batch"], "checkpoint_unet": self.options["checkpoint_unet"],
                "split_cfg": self.options["split_cfg"]}

    def table(self) -> str:
        """A markdown summary: options, then the breakdown at the peak and every phase."""
        lines = ["| option | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.options.items()]
        lines += ["", f"estimated peak {self.peak_gib:.2f} GiB (phase: {self.peak_phase}); "
                      f"budget {self.config.max_memory_gb or 'none'} GiB", "", "| part | GiB |", "|---|---|"]
        lines += [f"| {k} | {v / GIB:.3f} |" for k, v in self.breakdown.items()]
        lines += ["", "| phase (activations) | GiB |", "|---|---|"]
        lines += [f"| {k} | {v / GIB:.3f} |" for k, v in self.phases.items()]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def _evaluate(cfg: PlanConfig, options: dict, table: MeasurementTable, counts: StepCounts) -> Plan:
    B, T, hw = cfg.batch_size, cfg.num_steps, cfg.latent_hw()
    split = options["split_cfg"]
    cfg_mode = "none" if not cfg.cfg else ("split" if split else "together")
    common = dict(precision=cfg.precision, attention=cfg.attention)
    unet = dict(common, lora_rank=cfg.lora_rank, cfg_mode=cfg_mode)

    phases = {"rollout": table.unet_phase(cfg.model, B, hw, grad="none", checkpoint=False, **unet),
              "vae_reward": table.reward_phase(cfg.reward, B, options["decode_chunk"], hw, grad=counts.reward_grad,
                                               checkpoint_vae=options["checkpoint_vae"], **common)}
    if counts.pathwise:
        phases["unet_step"] = table.unet_phase(cfg.model, B, hw, grad="input",
                                               checkpoint=options["checkpoint_unet"], **unet)
    steps_per_call = 0
    if counts.likelihood_ratio:
        steps_per_call = options["max_batch"] // B
        phases["lr_chunk"] = table.unet_phase(cfg.model, steps_per_call * B, hw, grad="params",
                                              checkpoint=options["checkpoint_unet"], **unet)

    def weights(part: str) -> int:
        return table.param_bytes(part, cfg.model, cfg.reward, cfg.precision, cfg.lora_rank)

    lora = weights("lora")
    parameters = weights("unet") + lora + weights("vae") + weights("reward")
    if not options["free_text_encoder"]:
        parameters += weights("text_encoder")
    latent = 4 * hw[0] * hw[1] * (2 if cfg.precision == "half" else 4)  # bytes of one sample's latents
    cond_dim = 768 if isinstance(cfg.model, str) else \
        table._unet(cfg.model, cfg.precision, cfg.lora_rank).config.cross_attention_dim  # SD1.4: CLIP-L, 768
    trajectory = (B * latent * (2 * T + 1)  # x_T .. x_0 and T noises
                  + B * T * 4  # log-densities
                  + B * PROMPT_TOKENS * cond_dim * 2 * (2 if cfg.cfg else 1)  # prompt embeddings (fp16)
                  + B * latent)  # dR/dx0, kept through the sweep
    resident = {"parameters": parameters, "optimizer_state": lora * (1 + ADAMW_STATE_PER_PARAM),
                "trajectory": trajectory}
    peak_phase = max(phases, key=phases.get)
    breakdown = dict(resident, **{name: (v if name == peak_phase else 0) for name, v in phases.items()})

    calls_per_unet_step = 2 if cfg_mode == "split" else 1
    lr_calls = math.ceil(counts.likelihood_ratio / steps_per_call) if steps_per_call else 0
    model_calls = (calls_per_unet_step * (T + counts.pathwise + lr_calls) + math.ceil(B / options["decode_chunk"]))
    cfg_mult = 2 if cfg.cfg else 1
    extra = 0
    if options["checkpoint_unet"]:
        recomputed = (counts.pathwise + counts.likelihood_ratio) * B * cfg_mult
        extra += recomputed * table.flops("unet", cfg.model, hw)
    if options["checkpoint_vae"] and counts.reward_grad:
        extra += B * table.flops("vae_decode", cfg.model, hw)  # LatentReward re-decodes in the backward
    return Plan(config=cfg, options=dict(options), peak_bytes=sum(breakdown.values()), breakdown=breakdown,
                phases=phases, peak_phase=peak_phase, extra_flops=extra, model_calls=model_calls)


def _candidates(cfg: PlanConfig, counts: StepCounts) -> Iterator[dict]:
    B = cfg.batch_size
    chunk_sizes = [B * m for m in range(1, counts.likelihood_ratio + 1)] or [None]
    for split in ((False, True) if cfg.cfg else (False,)):
        for ckpt_unet in ((False, True) if counts.pathwise or counts.likelihood_ratio else (False,)):
            for ckpt_vae in ((False, True) if counts.reward_grad else (False,)):
                for decode_chunk in range(1, B + 1):
                    for free_te in (False, True):
                        for max_batch in chunk_sizes:
                            yield {"max_batch": max_batch, "checkpoint_unet": ckpt_unet, "checkpoint_vae": ckpt_vae,
                                   "decode_chunk": decode_chunk, "split_cfg": split, "free_text_encoder": free_te}


def _cost(p: Plan) -> tuple:
    # least recomputation first, then fewest (larger, more efficient) model calls, then keep the
    # text encoder (freeing it means new prompts cannot be encoded)
    return (p.extra_flops, p.model_calls, p.options["free_text_encoder"], p.peak_bytes)


def plan(config: Union[None, dict, PlanConfig, Any] = None, max_memory_gb: Optional[float] = None, *,
         table: Optional[MeasurementTable] = None, **overrides) -> Plan:
    """Choose max_batch, checkpoint_unet, checkpoint_vae, decode_chunk, split_cfg and free_text_encoder
    for one update so that its estimated peak fits `max_memory_gb` (GiB) with the least recomputation.

    `config`: a dict of PlanConfig settings, a PlanConfig, or an rlr_fast Config (its fields are read
    by name); `overrides` replace single settings. Without a budget the plan is the fastest one.
    Raises PlanError, naming the smallest achievable peak and its options, when nothing fits.
    """
    if max_memory_gb is not None:
        overrides["max_memory_gb"] = max_memory_gb
    cfg = PlanConfig.from_any(config, **overrides)
    table = table or default_table()
    counts = step_counts(cfg)
    plans = [_evaluate(cfg, options, table, counts) for options in _candidates(cfg, counts)]
    fitting = [p for p in plans if p.fits]
    if not fitting:
        smallest = min(plans, key=lambda p: (p.peak_bytes, _cost(p)))
        raise PlanError(
            f"no memory plan fits max_memory_gb={cfg.max_memory_gb}: the smallest achievable estimated peak is "
            f"{smallest.peak_gib:.2f} GiB (options {smallest.options}; largest phase {smallest.peak_phase}). "
            "Lower batch_size, resolution or the reward's size, or raise the budget.", smallest)
    chosen = min(fitting, key=_cost)
    chosen.notes = _notes(cfg)
    return chosen


def _notes(cfg: PlanConfig) -> list[str]:
    notes = ["tensor bytes only (what torch.cuda.max_memory_allocated counts): the CUDA context (~0.3-0.5 GiB) "
             "and allocator caching come on top",
             f"attention: {'flash / memory-efficient SDPA (no stored softmax)' if cfg.attention == 'flash' else 'MATH SDPA (stores the softmax)'}",
             {"autocast": "fp16 weights under CUDA autocast (group_norm / layer_norm outputs in fp32), LoRA + AdamW in fp32",
              "half": "fp16 weights without autocast (fp16 activations), LoRA + AdamW in fp32",
              "float32": "float32 weights and activations"}[cfg.precision],
             "VAE: the whole SD1.4 AutoencoderKL is resident (the encoder too); decode via rewards.latent.LatentReward"]
    return notes


# ==============================================================================================
# Regenerating the cache


def generate_measurements(path: Path = MEASUREMENTS_FILE, precisions: Sequence[str] = ("autocast", "half"),
                          log: Callable[[str], None] = print) -> Path:
    """Measure everything `plan()` needs for SD1.4 at 512 px (every method, guidance on and off, both
    precisions) and write the JSON cache. Also checks the linear fits at a further point."""
    import time

    table = MeasurementTable(path=None)
    hw = (64, 64)
    start = time.time()
    for precision in precisions:
        for reward in REWARDS:
            for grad, ckpt in ((True, False), (True, True), (False, False)):
                table.reward_phase(reward, 1, 1, hw, precision=precision, attention="flash", grad=grad,
                                   checkpoint_vae=ckpt)
            for part in ("vae", "reward"):
                table.param_bytes(part, "sd14", reward, precision, 4)
        for cfg_mode in ("none", "together", "split"):
            for grad, ckpt in (("none", False), ("input", False), ("input", True), ("params", False), ("params", True)):
                table.unet_phase("sd14", 1, hw, precision=precision, attention="flash", lora_rank=4, cfg_mode=cfg_mode,
                                 grad=grad, checkpoint=ckpt)
                log(f"{precision} unet cfg={cfg_mode} grad={grad} ckpt={ckpt}: {time.time() - start:.0f} s")
        for part in ("unet", "lora", "text_encoder"):
            table.param_bytes(part, "sd14", "aesthetic", precision, 4)
    table.flops("vae_decode", "sd14", hw)
    table.flops("unet", "sd14", hw)

    # the fits, checked where they extrapolate
    checks = []
    unet = table._unet("sd14", precisions[0], 4)
    measured = measure_unet_phase(unet, 4, hw, cfg_mode="together", grad="params", checkpoint=False,
                                  precision=precisions[0]).peak_bytes
    fitted = table.unet_phase("sd14", 4, hw, precision=precisions[0], attention="flash", lora_rank=4,
                              cfg_mode="together", grad="params", checkpoint=False)
    checks.append({"what": f"unet lr chunk, 4 samples, cfg together, {precisions[0]}", "measured": measured,
                   "fitted": fitted, "rel_error": abs(fitted - measured) / measured})
    vae, module = table._reward_models("aesthetic", precisions[0])
    measured = measure_reward_phase(vae, module, 4, hw, decode_chunk=2, checkpoint_vae=True, grad=True,
                                    precision=precisions[0]).peak_bytes
    fitted = table.reward_phase("aesthetic", 4, 2, hw, precision=precisions[0], attention="flash", grad=True,
                                checkpoint_vae=True)
    checks.append({"what": f"vae+aesthetic, batch 4, decode_chunk 2, checkpointed, {precisions[0]}",
                   "measured": measured, "fitted": fitted, "rel_error": abs(fitted - measured) / measured})
    table.data["fit_checks"] = checks
    for c in checks:
        log(f"fit check {c['what']}: relative error {c['rel_error']:.4f}")
    return table.save(path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlr_fast.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help=f"regenerate {MEASUREMENTS_FILE.name} (minutes)")
    parser.add_argument("--max-memory-gb", type=float, default=None)
    parser.add_argument("--config", default="{}", help='JSON dict of PlanConfig settings, e.g. \'{"h": 4}\'')
    args = parser.parse_args(argv)
    if args.measure:
        print(f"wrote {generate_measurements()}")
        return
    print(plan(json.loads(args.config), max_memory_gb=args.max_memory_gb).table())


if __name__ == "__main__":
    main()
