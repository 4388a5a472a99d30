"""The phases of one update, measured on meta through rlr_fast's own code paths.

The phases are never alive together (each frees its graph before the next starts):

* rollout: `rollout.rollout`, no grad; one UNet forward at a time (DDIM, or a flow transformer's
  flow SDE: `sampler`).
* decode: dR/dx0's VAE part, `rewards.latent.LatentReward` with a network-free reward.
* reward network: the reward's forward and backward on the decoded images.
* UNet step: one pathwise step with an input gradient, `sweep.pathwise_sweep`.
* likelihood-ratio chunk: one model call over several steps, `sweep.likelihood_ratio`.

The decode and the reward network are one phase in the loop, measured apart because they grow
with different things (the decoder with `decode_chunk`, the network with the batch): while the
network runs, what the decode saved for its backward is alive; while the decoder back-propagates,
the network's graph is gone. `reward_phase_parts` puts them together, and `measure_reward_phase`
measures the whole LatentReward path to check that.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .architectures import PixelReward, as_unchecked_reward, module_state
from .measure import Measurement, count_flops, measure

CFG_MODES = ("none", "together", "split")
UNET_GRADS = ("none", "input", "params")


def is_flow(unet: nn.Module) -> bool:
    """Whether the network is a flow transformer (rlr_fast.flow), sampled with the flow SDE."""
    from ..families import FLUX, SD3, family_of

    return family_of(unet) in (SD3, FLUX)


def sampler(unet: nn.Module):
    """The sampler the network's loader gives it: the flow SDE over SD3's FlowMatchEulerDiscreteScheduler
    (shift 3) for a flow transformer, else SD1.x's DDIM. The bytes of a step do not depend on its
    coefficients: the step is the same fused op for both."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from ..samplers import FlowSampler

    if is_flow(unet):
        return FlowSampler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def conditioning_shape(unet: nn.Module) -> tuple[int, int]:
    """(rows, width) of one sample's conditioning, as the UNet's family (rlr_fast.families) packs it."""
    from ..families import family_of

    return family_of(unet).conditioning_shape(unet)


def meta_trajectory(steps: int, batch: int, latent_hw: tuple[int, ...], unet: nn.Module, *, cfg: bool):
    """A stored chain of `steps` steps on meta, as `rollout` stores it: latents in float32 (the loop
    draws x_T in float32 and the chain stays there), prompt embeddings in the weights' dtype, shaped
    as the UNet's family packs them. latent_hw is (h, w), or (frames, h, w) for a video UNet."""
    from ..rollout import Trajectory
    from ..samplers import StepSchedule

    cond_dtype = next(p.dtype for p in unet.parameters() if not p.requires_grad)

    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, device="meta", dtype=dtype)

    shape = (batch, unet.config.in_channels) + tuple(latent_hw)
    cond = (batch,) + conditioning_shape(unet)
    tables = [empty(steps, dtype=torch.float64) for _ in range(5)]
    time_dtype = torch.float32 if is_flow(unet) else torch.int64  # FlowSampler's sigma * 1000, DDIM's int steps
    schedule = StepSchedule(torch.full((steps,), 500, device="meta", dtype=time_dtype), *tables)
    return Trajectory(
        latents=empty(steps + 1, *shape), noises=empty(steps, *shape), schedule=schedule, log_probs=empty(steps, batch),
        eta=1.0, encoder_hidden_states=empty(*cond, dtype=cond_dtype),
        negative_encoder_hidden_states=empty(*cond, dtype=cond_dtype) if cfg else None,
        guidance_scale=7.5 if cfg else 1.0)


def measure_unet_phase(unet: nn.Module, samples: int, latent_hw: tuple[int, int], *, cfg_mode: str, grad: str,
                       checkpoint: bool, autocast: bool, attention: str = "flash") -> Measurement:
    """One UNet phase on `samples` trajectory samples, run as the loop runs it.

    grad: "none" (a rollout step), "input" (a pathwise step: gradient for its input and the LoRA)
    or "params" (a likelihood-ratio call over `samples` steps of one sample: LoRA gradient only).
    cfg_mode: "none", "together" (one call on 2 x samples) or "split" (`split_cfg`).
    """
    from ..options import EstimatorOptions
    from ..rollout import rollout
    from ..sweep import CallCounter, gradient_checkpointing, likelihood_ratio, pathwise_sweep

    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
    if grad not in UNET_GRADS:
        raise ValueError(f"grad must be one of {UNET_GRADS}, got {grad!r}")
    opts = EstimatorOptions(max_batch=samples, checkpoint_unet=checkpoint, split_cfg=cfg_mode == "split",
                            backend="reference")
    steps, batch = (samples, 1) if grad == "params" else (2, samples)
    traj = meta_trajectory(steps, batch, latent_hw, unet, cfg=cfg_mode != "none")
    weights = torch.empty((steps, batch), device="meta")
    cotangent = torch.empty_like(traj.latents[0])
    existing = (module_state(unet) + [weights, cotangent] + [v for v in vars(traj).values() if torch.is_tensor(v)]
                + list(traj.schedule.tables().values()))

    def run():
        if grad == "none":
            rollout(unet, sampler(unet), traj.latents[0], num_steps=1, eta=1.0,
                    encoder_hidden_states=traj.encoder_hidden_states, guidance_scale=traj.guidance_scale,
                    negative_encoder_hidden_states=traj.negative_encoder_hidden_states, split_cfg=opts.split_cfg,
                    backend="reference")
        elif grad == "input":  # step 1 with its input's gradient (step 0 then needs none: smaller)
            pathwise_sweep(unet, traj, 1, 0, cotangent, opts, CallCounter())
        else:
            likelihood_ratio(unet, traj, list(range(steps)), weights, opts, CallCounter())

    with gradient_checkpointing(unet, checkpoint and grad != "none"):
        return measure(run, existing=existing, attention=attention, autocast=autocast)


def _latents(vae: nn.Module, batch: int, latent_hw, grad: bool) -> torch.Tensor:
    shape = (batch, vae.config.latent_channels) + tuple(latent_hw)
    return torch.empty(shape, device="meta", dtype=torch.float32).requires_grad_(grad)


def _reward_pass(reward_fn, x: torch.Tensor, grad: bool) -> None:
    # as scoring.chain_rewards computes R and dR/dx0
    with torch.set_grad_enabled(grad):
        r = reward_fn(x)
        if grad:
            torch.autograd.grad(r.sum(), x)


def measure_reward_phase(vae: nn.Module, reward: nn.Module, batch: int, latent_hw: tuple[int, int], *,
                         decode_chunk: int, checkpoint_vae: bool, grad: bool, autocast: bool,
                         attention: str = "flash") -> Measurement:
    """R(x0) and, with `grad`, dR/dx0 of a batch, through rewards.latent.LatentReward as the loop
    calls it (inside the estimate, so under autocast when the run uses it)."""
    from ..rewards.latent import LatentReward

    reward_fn = LatentReward(vae, as_unchecked_reward(reward), ["a prompt"] * batch, decode_chunk=decode_chunk,
                             checkpoint_vae=checkpoint_vae)
    x0 = _latents(vae, batch, latent_hw, grad)
    existing = module_state(vae) + module_state(reward) + [x0]
    return measure(lambda: _reward_pass(reward_fn, x0, grad), existing=existing, attention=attention,
                   autocast=autocast)


def measure_decode_phase(vae: nn.Module, batch: int, latent_hw: tuple[int, int], *, decode_chunk: int,
                         checkpoint_vae: bool, grad: bool, autocast: bool, attention: str = "flash") -> Measurement:
    """The VAE's share of the reward phase: the LatentReward path with a reward without a network."""
    return measure_reward_phase(vae, PixelReward(), batch, latent_hw, decode_chunk=decode_chunk,
                                checkpoint_vae=checkpoint_vae, grad=grad, autocast=autocast, attention=attention)


def measure_reward_network(reward: nn.Module, batch: int, image_hw: tuple[int, int], *, grad: bool,
                           attention: str = "flash") -> Measurement:
    """The reward network's share: its forward (and backward to the images) on `batch` float32
    images, outside autocast as LatentReward calls it; the images are counted."""
    unchecked = as_unchecked_reward(reward)

    def run():
        images = torch.empty((batch, 3) + tuple(image_hw), device="meta").requires_grad_(grad)
        _reward_pass(lambda x: unchecked(x, ["a prompt"] * batch), images, grad)

    return measure(run, existing=module_state(reward), attention=attention)


def reward_phase_parts(decode: Measurement, network_peak: int) -> dict[str, int]:
    """The reward phase's two peaks: the decoder's own, and the network's on top of what the decode
    keeps for its backward. The phase peaks at the larger."""
    return {"reward: decode": decode.peak_bytes, "reward: network": decode.saved_bytes + network_peak}


def combined_reward_bytes(decode: Measurement, network_peak: int) -> int:
    return max(reward_phase_parts(decode, network_peak).values())


def forward_flops(module: nn.Module, part: str, latent_hw: tuple[int, ...], image_hw: Optional[tuple] = None) -> int:
    """FLOPs of one sample's forward: part "unet" (one step; latent_hw (frames, h, w) for a video
    UNet), "vae_decode" or "reward"."""
    from ..rollout import predict

    with torch.no_grad():
        if part == "unet":
            x = torch.empty((1, module.config.in_channels) + tuple(latent_hw), device="meta", dtype=module.dtype)
            cond = torch.empty((1,) + conditioning_shape(module), device="meta", dtype=module.dtype)
            t = torch.empty((1,), device="meta", dtype=torch.int64)
            return count_flops(lambda: predict(module, x, t, cond))
        if part == "vae_decode":
            z = torch.empty((1, module.config.latent_channels) + tuple(latent_hw), device="meta", dtype=module.dtype)
            return count_flops(lambda: module.decode(z))
        if part == "reward":
            images = torch.empty((1, 3) + tuple(image_hw), device="meta")
            return count_flops(lambda: as_unchecked_reward(module)(images, ["a prompt"]))
    raise ValueError(f"part must be 'unet', 'vae_decode' or 'reward', got {part!r}")
