"""Sampling rollouts that store what an estimator needs, and exact recomputation of any step.

Step indices: step k = 0 .. T-1 in `scheduler.timesteps` order (k = 0 is the noisiest).
`rlr_math.md` numbers steps t = T .. 1 instead; step k is math step t = T - k.
Step k reads `latents[k]` (x_t) and writes `latents[k + 1]` (x_{t-1}) with `noises[k]`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .ddim import check_scheduler, ddim_step, log_density_dtype, gaussian_log_prob, step_coefficients


@dataclass
class Trajectory:
    """A stored sampling chain x_T .. x_0 and everything needed to recompute any step exactly."""

    latents: torch.Tensor  # (T+1, B, ...) x_T .. x_0
    noises: torch.Tensor  # (T, B, ...) standard normal noise of each step
    timesteps: torch.Tensor  # (T,) int64, scheduler order
    sigmas: torch.Tensor  # (T,) float64, std of each step's noise (0: deterministic step)
    c_x: torch.Tensor  # (T,) float64, mean = c_x * x_t + c_e * model_output
    c_e: torch.Tensor  # (T,) float64
    log_probs: torch.Tensor  # (T, B) log-density of each step's draw (0 where sigma == 0)
    eta: float
    encoder_hidden_states: Optional[torch.Tensor] = None  # (B, L, D)
    negative_encoder_hidden_states: Optional[torch.Tensor] = None  # (B, L, D), CFG only
    guidance_scale: float = 1.0
    model_key: str = ""  # fingerprint of the model architecture that made it

    @property
    def num_steps(self) -> int:
        return self.noises.shape[0]

    @property
    def batch_size(self) -> int:
        return self.latents.shape[1]

    @property
    def x0(self) -> torch.Tensor:
        return self.latents[-1]

    @property
    def uses_cfg(self) -> bool:
        return self.negative_encoder_hidden_states is not None and self.guidance_scale != 1.0

    def math_step(self, k: int) -> int:
        """The `rlr_math.md` index t of step k."""
        return self.num_steps - k

    def step_index(self, t: int) -> int:
        """The step k of the `rlr_math.md` index t."""
        return self.num_steps - t


def model_key(model: torch.nn.Module) -> str:
    """Fingerprint of a model's architecture (parameter names and shapes, adapters excluded)."""
    h = hashlib.sha1(type(model).__name__.encode())
    for name, p in model.named_parameters():
        if "lora_" not in name:
            h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def _model_output(model, sample, timestep, encoder_hidden_states) -> torch.Tensor:
    if encoder_hidden_states is not None and _conditions_per_frame(model):
        # AnimateDiff's UNet takes one prompt per frame, (B * F, L, D), as its pipeline passes it
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
    out = model(sample, timestep, encoder_hidden_states=encoder_hidden_states)
    out = getattr(out, "sample", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out) or out.shape != sample.shape:
        raise TypeError(
            "the model must return a tensor (or an object with .sample) shaped like its input "
            f"{tuple(sample.shape)}, got {getattr(out, 'shape', type(out).__name__)}"
        )
    # under autocast the UNet answers in fp16/bf16 while the chain is kept in the latents' dtype
    return out.to(sample.dtype)


def predict(model, sample, timestep, cond, negative=None, guidance_scale=1.0, split_cfg=False):
    """Model output(s) for the fused step: (model_output, model_output_cond or None).

    With guidance, the unconditional and conditional passes run as one batch of 2B unless
    `split_cfg` (two calls: half the activation memory in a backward sweep).
    """
    if negative is None or guidance_scale == 1.0:
        return _model_output(model, sample, timestep, cond), None
    if split_cfg:
        return (_model_output(model, sample, timestep, negative),
                _model_output(model, sample, timestep, cond))
    t2 = torch.cat([timestep, timestep]) if timestep.dim() else timestep
    out = _model_output(model, torch.cat([sample, sample]), t2, torch.cat([negative, cond]))
    return out.chunk(2)


def _check_float(name: str, t: Optional[torch.Tensor]) -> None:
    if t is not None and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _batch_cond(name: str, cond: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    if cond is None:
        return None
    _check_float(name, cond)
    if cond.dim() != 3:
        raise ValueError(f"{name} must be (batch, tokens, dim), got shape {tuple(cond.shape)}")
    if cond.shape[0] == 1 and batch > 1:
        return cond.expand(batch, -1, -1)
    if cond.shape[0] != batch:
        raise ValueError(f"{name} has batch size {cond.shape[0]} but latents have batch size {batch}")
    return cond


# The latent layout of the diffusers models we know by class name (subclasses included); any other
# model is only asked for a batch dimension and, when its config names in_channels, channels at dim 1.
LATENT_LAYOUTS = {
    "UNet2DConditionModel": ("batch", "channels", "height", "width"),
    "UNet3DConditionModel": ("batch", "channels", "frames", "height", "width"),
    "UNetMotionModel": ("batch", "channels", "frames", "height", "width"),
}


def _class_names(model) -> list[str]:
    return [cls.__name__ for cls in type(model).__mro__]


def latent_layout(model) -> Optional[tuple[str, ...]]:
    """The dimension names of the latents `model` takes, or None for a model we do not know."""
    return next((LATENT_LAYOUTS[n] for n in _class_names(model) if n in LATENT_LAYOUTS), None)


def _conditions_per_frame(model) -> bool:
    return "UNetMotionModel" in _class_names(model)


def _check_latents(model, latents: torch.Tensor) -> None:
    if not torch.is_tensor(latents):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    _check_float("latents", latents)
    layout = latent_layout(model)
    in_channels = getattr(getattr(model, "config", None), "in_channels", None)
    if layout is not None and latents.dim() != len(layout):
        names = ", ".join(str(in_channels) if d == "channels" and in_channels else d for d in layout)
        raise ValueError(f"{type(model).__name__} takes latents ({names}), got shape {tuple(latents.shape)} "
                         f"(rank {latents.dim()})")
    if latents.dim() < 2:
        raise ValueError(f"latents must have a batch dimension, got shape {tuple(latents.shape)}")
    if in_channels is not None and latents.shape[1] != in_channels:
        raise ValueError(f"latents have {latents.shape[1]} channels but the model expects "
                         f"{in_channels}: shape {tuple(latents.shape)}")


def check_rollout_args(model, scheduler, latents, num_steps, eta, guidance_scale, encoder_hidden_states,
                       negative_encoder_hidden_states):
    """Validate a rollout's arguments; returns the conditioning broadcast to the batch."""
    _check_latents(model, latents)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"num_steps must be an int, got {num_steps!r}")
    n_train = scheduler.config.num_train_timesteps
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps must be in [1, {n_train}] (num_train_timesteps), got {num_steps}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if guidance_scale != 1.0 and negative_encoder_hidden_states is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs negative_encoder_hidden_states "
                         "(the unconditional / negative-prompt embeddings)")
    batch = latents.shape[0]
    cond = _batch_cond("encoder_hidden_states", encoder_hidden_states, batch)
    negative = _batch_cond("negative_encoder_hidden_states", negative_encoder_hidden_states, batch)
    if negative is not None and cond is None:
        raise ValueError("negative_encoder_hidden_states given without encoder_hidden_states")
    return cond, negative


@torch.no_grad()
def rollout(model, scheduler, latents, *, num_steps: int, eta: float, encoder_hidden_states=None,
            guidance_scale: float = 1.0, negative_encoder_hidden_states=None, generator=None,
            progress: bool = False, split_cfg: bool = False, backend: str = "auto") -> Trajectory:
    """Sample x_T -> x_0 with DDIM under no grad and store the chain.

    `latents` is x_T: (B, C, H, W) for an image UNet, (B, C, F, H, W) for a video UNet (F frames),
    any shape with a leading batch dimension for other models. The scheduler must be a
    `DDIMScheduler`; this calls `scheduler.set_timesteps(num_steps)`. Noise for every step is drawn with `generator`.
    """
    check_scheduler(scheduler)
    cond, negative = check_rollout_args(model, scheduler, latents, num_steps, eta, guidance_scale,
                                        encoder_hidden_states, negative_encoder_hidden_states)
    batch = latents.shape[0]

    scheduler.set_timesteps(num_steps)
    coef = step_coefficients(scheduler, eta)
    device, dtype = latents.device, latents.dtype
    xs = latents.new_empty((num_steps + 1,) + tuple(latents.shape))
    noises = torch.randn((num_steps,) + tuple(latents.shape), generator=generator,
                         device=device if generator is None else generator.device, dtype=dtype).to(device)
    log_probs = latents.new_empty((num_steps, batch), dtype=log_density_dtype(dtype))
    xs[0] = latents
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="rollout", leave=False)
    for k in steps:
        t = coef.timesteps[k].to(device)
        out, out_cond = predict(model, xs[k], t, cond, negative, guidance_scale, split_cfg)
        per = [v[k].expand(batch).to(device) for v in (coef.c_x, coef.c_e, coef.sigmas)]
        prev, _, logp = ddim_step(xs[k], out, noises[k], *per, model_output_cond=out_cond,
                                  guidance_scale=guidance_scale, backend=backend)
        xs[k + 1] = prev
        log_probs[k] = logp
    return Trajectory(latents=xs, noises=noises, timesteps=coef.timesteps.to(device),
                      sigmas=coef.sigmas.to(device), c_x=coef.c_x.to(device), c_e=coef.c_e.to(device),
                      log_probs=log_probs, eta=float(eta), encoder_hidden_states=cond,
                      negative_encoder_hidden_states=negative, guidance_scale=float(guidance_scale),
                      model_key=model_key(model))


def stacked_inputs(traj: Trajectory, ks: Sequence[int], sample: Optional[torch.Tensor] = None):
    """What one model call on steps `ks` reads, stacked along the batch (per-sample timesteps).

    Returns the inputs (n * B, ...) (`sample` (n, B, ...) in place of the stored ones), the
    timesteps (n * B,), the conditioning and negative conditioning repeated per step (None where
    absent) and the per-sample coefficients (c_x, c_e, sigma), each (n * B,).
    """
    n, b = len(ks), traj.batch_size
    idx = torch.as_tensor(ks, device=traj.latents.device)
    x = traj.latents[idx] if sample is None else sample
    flat = x.reshape((n * b,) + tuple(x.shape[2:]))
    repeat = (lambda c: None if c is None else c.repeat(n, 1, 1))
    coefficients = tuple(v[idx].repeat_interleave(b) for v in (traj.c_x, traj.c_e, traj.sigmas))
    return (flat, traj.timesteps[idx].repeat_interleave(b), repeat(traj.encoder_hidden_states),
            repeat(traj.negative_encoder_hidden_states), coefficients)


def recompute_steps(model, traj: Trajectory, ks: Sequence[int], sample: Optional[torch.Tensor] = None,
                    *, split_cfg: bool = False, backend: str = "auto", with_log_prob: bool = False):
    """Recompute the means of steps `ks` in one model call, with grad enabled.

    The steps' inputs are stacked along the batch (per-sample timesteps), so n steps of a
    batch of B cost one call on n * B samples. `sample` (n, B, ...) replaces the stored inputs
    (pass a tensor that requires grad to back-propagate into it). Returns the means
    (n, B, ...) and, with `with_log_prob`, the log-density (n, B) of each stored output under
    the recomputed mean.
    """
    ks = list(ks)
    flat, t, cond, negative, per = stacked_inputs(traj, ks, sample)
    out, out_cond = predict(model, flat, t, cond, negative, traj.guidance_scale, split_cfg)
    idx = torch.as_tensor(ks, device=traj.latents.device)
    noise = traj.noises[idx].reshape(flat.shape)
    _, mean, _ = ddim_step(flat, out, noise, *per, model_output_cond=out_cond,
                           guidance_scale=traj.guidance_scale, backend=backend)
    mean = mean.reshape((len(ks), traj.batch_size) + tuple(flat.shape[1:]))
    if not with_log_prob:
        return mean
    target = traj.latents[idx + 1]
    logp = gaussian_log_prob(target.reshape(flat.shape), mean.reshape(flat.shape), per[2], backend=backend)
    return mean, logp.reshape(len(ks), traj.batch_size)


def recompute_step(model, traj: Trajectory, k: int, sample: Optional[torch.Tensor] = None, **kw):
    """The mean of step k recomputed from its stored input (or `sample`), with grad enabled."""
    if not 0 <= k < traj.num_steps:
        raise IndexError(f"step {k} outside the trajectory's {traj.num_steps} steps")
    return recompute_steps(model, traj, [k], None if sample is None else sample.unsqueeze(0), **kw)[0]
