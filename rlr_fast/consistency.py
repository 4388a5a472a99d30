"""SQDF's soft Q from a latent consistency model: x_k -> x_0 in one or a few consistency steps.

docs/estimator.md §11.5. The public SQDF code scores R(x0_hat) with x0_hat from an LCM (SD1.5 with the
LCM-LoRA fused into a second UNet copy). Here the consistency model is either

* an LCM-LoRA folder (diffusers format, e.g. latent-consistency/lcm-lora-sdv1-5) loaded as a second
  named peft adapter, `consistency`, on the policy's own UNet: no second UNet in memory. Three
  networks share the weights and never mix: the policy (its LoRA, `default`, alone: what trains and
  what `save_lora` writes), the base model (every adapter off: the KL reference, `lora.lora_disabled`)
  and the consistency model (the `consistency` adapter alone, `consistency_adapter_only`); or
* a full LCM UNet folder (a UNet, or a pipeline folder with unet/), a second frozen network.

One consistency step follows diffusers' LCMScheduler.step from x at timestep tau:

    x0_pred  = (x - sqrt(1 - a_tau) eps(x, tau)) / sqrt(a_tau)
    denoised = c_out(tau) x0_pred + c_skip(tau) x,   c_skip = s^2 / ((10 tau)^2 + s^2),
                                                     c_out = 10 tau / sqrt((10 tau)^2 + s^2), s = 0.5

with tau the consistency timestep (of LCMScheduler.set_timesteps(T)) nearest the DDIM timestep of x,
as the public code maps it. N steps walk the LCM timesteps from there down to the last, evenly, and
re-noise between steps, denoised -> sqrt(a_next) denoised + sqrt(1 - a_next) z, with z drawn from a
generator seeded by the input's bytes: SQDF calls the estimate twice (value, then VJP), and both calls
must see the same chain. A UNet with `time_cond_proj_dim` (a full LCM) gets the guidance-scale
embedding of w - 1 and the conditional prompt alone; without it, w != 1 runs classifier-free guidance
with the chain's negative prompt; w = 1 (the public code's) is the conditional prompt alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer

from .lora import LORA_WEIGHT_NAME

__all__ = ["ADAPTER", "ConsistencyX0", "load_consistency", "consistency_of", "consistency_adapter_only",
           "guidance_embedding"]

ADAPTER = "consistency"  # the peft adapter name of an LCM-LoRA on the policy's UNet
_ATTRIBUTE = "rlr_fast_consistency"  # where load_consistency leaves the estimator on the UNet
SIGMA_DATA = 0.5  # LCMScheduler's boundary-condition constant (fixed there too)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000 w, (B, dim): the `timestep_cond` an LCM UNet with
    time_cond_proj_dim = dim is distilled with (w is the guidance scale minus one)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))
    angles = 1000.0 * w.double().reshape(-1, 1) * frequencies
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


@contextlib.contextmanager
def consistency_adapter_only(unet: torch.nn.Module):
    """While entered, the UNet is the consistency model: the `consistency` adapter on, every other
    adapter off, no parameter requiring grad (a VJP runs to the input alone); each layer's active
    adapters, its on/off switch and every requires_grad flag are as before afterwards (inside
    lora.lora_disabled too)."""
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    for layer in layers:
        layer.enable_adapters(True)
        layer.set_adapter([ADAPTER])  # peft marks the adapter trainable: nothing here is, only the input
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield unet
    finally:
        for layer, active, disabled in saved:
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


class ConsistencyX0:
    """An `x0_estimator` for sqdf: (reference, states) -> x0_hat, differentiable in states.x.

    `network` is a separate LCM UNet, or None for the `consistency` adapter on the UNet SQDF passes
    as `reference`; `scheduler` the run's scheduler (its betas), made an LCMScheduler."""

    def __init__(self, scheduler, network: Optional[torch.nn.Module] = None, *, steps: int = 1,
                 guidance: float = 1.0):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"consistency_steps must be an integer >= 1, got {steps!r}")
        self.lcm = LCMScheduler.from_config(scheduler.config)
        if self.lcm.config.prediction_type != "epsilon":
            raise ValueError(f"the consistency estimate takes an epsilon-predicting model; the scheduler says "
                             f"prediction_type={self.lcm.config.prediction_type!r}")
        self.network, self.steps, self.guidance = network, steps, guidance

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The LCM timesteps (descending, int64) of LCMScheduler.set_timesteps for a chain of T steps
        (at most its original_inference_steps)."""
        self.lcm.set_timesteps(min(num_steps, self.lcm.config.original_inference_steps))
        return self.lcm.timesteps.cpu().long()

    def plan(self, timesteps: torch.Tensor, num_steps: int) -> torch.Tensor:
        """(N, B) the LCM timestep of each consistency step of each sample: the nearest one to its DDIM
        timestep, then evenly down the rest of the LCM schedule."""
        taus = self.timesteps(num_steps)
        start = (timesteps.cpu().long().reshape(-1, 1) - taus).abs().argmin(1)
        rows = [start + (m * (len(taus) - start)) // self.steps for m in range(self.steps)]
        return taus[torch.stack(rows)]

    def _eps(self, unet, x, tau, cond, negative) -> torch.Tensor:
        kwargs = {}
        guided = negative is not None and self.guidance != 1.0
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            w = torch.full((x.shape[0],), self.guidance - 1.0)
            kwargs["timestep_cond"] = guidance_embedding(w, unet.config.time_cond_proj_dim).to(x)
            guided = False  # the guidance is in the embedding
        if not guided:
            return unet(x, tau.to(x.device), encoder_hidden_states=cond, **kwargs).sample
        out = unet(torch.cat([x, x]), tau.repeat(2).to(x.device), encoder_hidden_states=torch.cat([negative, cond]))
        uncond, conditional = out.sample.chunk(2)
        return uncond + self.guidance * (conditional - uncond)

    def x0(self, unet, x: torch.Tensor, timesteps: torch.Tensor, num_steps: int, cond: torch.Tensor,
           negative: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x0_hat of x (B, ...) at DDIM `timesteps` (B,) of a chain of `num_steps`, after `steps`
        consistency steps, in the current grad mode."""
        return self.walk(unet, x, self.plan(timesteps, num_steps), cond, negative, generator)

    def walk(self, unet, x, plan: torch.Tensor, cond, negative=None, generator=None) -> torch.Tensor:
        """The consistency steps of `plan` (N, B) from x; the denoised sample of the last."""
        alphas = self.lcm.alphas_cumprod.double()
        per_sample = (-1,) + (1,) * (x.dim() - 1)
        for m, tau in enumerate(plan):
            a = alphas[tau].reshape(per_sample).to(x.device)
            scaled = tau.double() * self.lcm.config.timestep_scaling
            c_skip = (SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)).reshape(per_sample).to(x.device)
            c_out = (scaled / (scaled ** 2 + SIGMA_DATA ** 2).sqrt()).reshape(per_sample).to(x.device)
            eps = self._eps(unet, x, tau, cond, negative)
            denoised = ((c_out / a.sqrt()) * (x - (1 - a).sqrt() * eps) + c_skip * x).to(x.dtype)
            if m == len(plan) - 1:
                return denoised
            a_next = alphas[plan[m + 1]].reshape(per_sample).to(x.device)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = (a_next.sqrt() * denoised + (1 - a_next).sqrt() * z).to(x.dtype)

    def __call__(self, reference: torch.nn.Module, states) -> torch.Tensor:
        """x0_hat of `states` (an rlr_fast.sqdf.StepStates, which imports this module when it runs: no
        import back), each sample at its own step."""
        generator = None
        if self.steps > 1:  # the same re-noising in the value and the VJP pass: seeded by the input
            digest = hashlib.blake2b(states.x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                                     digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        args = (states.x, states.own_steps().timesteps, states.num_steps, states.encoder_hidden_states,
                states.negative_encoder_hidden_states, generator)
        if self.network is not None:
            return self.x0(self.network, *args)
        if ADAPTER not in getattr(reference, "peft_config", {}):
            raise ValueError("the consistency adapter lives on the policy's UNet, so SQDF's base model must be that "
                             "UNet with its adapters off: pass no reference= module with x0_estimator='consistency'")
        with consistency_adapter_only(reference):
            return self.x0(reference, *args)


def _is_lora_folder(folder: Path) -> bool:
    return (folder / LORA_WEIGHT_NAME).is_file() or (
        not (folder / "config.json").is_file() and not (folder / "unet").is_dir()
        and any(folder.glob("*.safetensors")))


def load_consistency(unet: UNet2DConditionModel, folder, scheduler, *, steps: int = 1,
                     guidance: float = 1.0) -> ConsistencyX0:
    """Load a local consistency model for `unet` and attach the estimator to it (`consistency_of`).

    An LCM-LoRA folder (a .safetensors of diffusers' or kohya's key layout, as released) becomes the
    UNet's `consistency` adapter, frozen and inactive outside `consistency_adapter_only`: the policy's
    adapter stays the active one. A UNet folder (config.json, or a pipeline folder with unet/) loads
    as a second frozen UNet in the UNet's dtype and device."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"consistency_model={str(folder)!r}: no such folder (an LCM-LoRA folder such as "
                                "lcm-lora-sdv1-5, or an LCM UNet folder)")
    parameter = next(unet.parameters())
    if _is_lora_folder(folder):
        weights, alphas = StableDiffusionPipeline.lora_state_dict(folder, local_files_only=True)
        if not any(k.startswith("unet.") for k in weights):
            raise ValueError(f"{folder} holds no UNet LoRA weights (keys {sorted(weights)[:3]})")
        flags = [(p, p.requires_grad) for p in unet.parameters()]
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            unet.load_lora_adapter(weights, network_alphas=alphas, prefix="unet", adapter_name=ADAPTER)
        policy = [name for name in unet.peft_config if name != ADAPTER]
        for layer in (m for m in unet.modules() if isinstance(m, BaseTunerLayer)):
            layer.set_adapter(policy)  # the policy's adapter (if any yet) stays the only active one
        for p, flag in flags:
            p.requires_grad_(flag)
        for name, p in unet.named_parameters():
            if f".{ADAPTER}." in name:
                p.data = p.data.to(parameter.dtype)
                p.requires_grad_(False)
        network = None
    else:
        sub = {"subfolder": "unet"} if (folder / "unet").is_dir() else {}
        network = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, torch_dtype=parameter.dtype,
                                                       **sub)
        network = network.to(parameter.device).eval().requires_grad_(False)
    estimator = ConsistencyX0(scheduler, network, steps=steps, guidance=guidance)
    setattr(unet, _ATTRIBUTE, estimator)
    return estimator


def consistency_of(unet: torch.nn.Module) -> ConsistencyX0:
    """The estimator `load_consistency` attached to the UNet; an error saying how to load one."""
    estimator = getattr(unet, _ATTRIBUTE, None)
    if estimator is None:
        raise ValueError("x0_estimator='consistency' needs a consistency model on the UNet: set consistency_model to "
                         "a local LCM-LoRA or LCM UNet folder (finetune loads it), or call "
                         "rlr_fast.consistency.load_consistency(unet, folder, scheduler)")
    return estimator
