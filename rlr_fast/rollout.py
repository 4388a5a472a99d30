"""Sampling rollouts that store what an estimator needs, and exact recomputation of any step.

Step indices: step k = 0 .. T-1 in sampling order (k = 0 is the noisiest; `scheduler.timesteps` order for DDIM).
docs/estimator.md §1 numbers steps t = T .. 1 instead; step k is math step t = T - k.
Step k reads `latents[k]` (x_t) and writes `latents[k + 1]` (x_{t-1}) with `noises[k]`.

Conditioning is per sample, or per step and sample (a prompt schedule, `rlr_fast.prompts`): then
`encoder_hidden_states` holds one embedding per distinct prompt (P, L, D) and `prompt_index` (T, B)
says which one sample b uses at step k. Every model call, in the rollout and in any recomputation,
reads its conditioning through `step_conditioning`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .ddim import ddim_step, gaussian_log_prob, log_density_dtype
from .families import family_of
from .samplers import TABLES, Sampler, StepSchedule, as_sampler


@dataclass
class Trajectory:
    """A stored sampling chain x_T .. x_0 and everything needed to recompute any step exactly."""

    latents: torch.Tensor  # (T+1, B, ...) x_T .. x_0
    noises: torch.Tensor  # (T, B, ...) standard normal noise of each step
    schedule: StepSchedule  # the sampler's per-step tables (samplers.py): timesteps, coefficients, sigmas
    log_probs: torch.Tensor  # (T, B) log-density of each step's draw (0 where sigma == 0)
    eta: float
    encoder_hidden_states: Optional[torch.Tensor] = None  # (B, L, D); (P, L, D) with prompt_index
    negative_encoder_hidden_states: Optional[torch.Tensor] = None  # (B, L, D), CFG only
    prompt_index: Optional[torch.Tensor] = None  # (T, B) int64: row of encoder_hidden_states per step, sample
    guidance_scale: float = 1.0
    model_key: str = ""  # fingerprint of the model architecture that made it
    x0_hat: Optional[torch.Tensor] = None  # (T, B, ...) Tweedie estimate of x_0 at each step (store_x0_hat)

    # The schedule's tables under their own names: mean = c_x x_t + c_e m, x_{t-1} = mean + sigma noise,
    # x0_hat = d_x x_t + d_e m, each (T,) float64; timesteps (T,), the network's time input.
    @property
    def timesteps(self) -> torch.Tensor:
        return self.schedule.timesteps

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas

    @property
    def c_x(self) -> torch.Tensor:
        return self.schedule.c_x

    @property
    def c_e(self) -> torch.Tensor:
        return self.schedule.c_e

    @property
    def d_x(self) -> torch.Tensor:
        return self.schedule.d_x

    @property
    def d_e(self) -> torch.Tensor:
        return self.schedule.d_e

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

    def step_conditioning(self, ks: torch.Tensor) -> Optional[torch.Tensor]:
        """The conditioning of steps `ks` (n,), stacked step-major along the batch: (n * B, L, D)."""
        return step_conditioning(self.encoder_hidden_states, self.prompt_index, ks)

    def math_step(self, k: int) -> int:
        """The math index t (docs/estimator.md §1) of step k."""
        return self.num_steps - k

    def step_index(self, t: int) -> int:
        """The step k of the math index t (docs/estimator.md §1)."""
        return self.num_steps - t


# Where each tensor field of a Trajectory keeps its samples; the schedule is per step and shared by
# every sample. A new field must be added to one of the two (tests check). Under a prompt schedule
# encoder_hidden_states holds distinct prompts, not samples: prompt_index says which.
PER_SAMPLE_DIM = {"latents": 1, "noises": 1, "log_probs": 1, "x0_hat": 1, "encoder_hidden_states": 0,
                  "negative_encoder_hidden_states": 0, "prompt_index": 1}
PER_STEP = ("schedule",)


def _sample_dims(traj: Trajectory) -> dict[str, int]:
    if traj.prompt_index is None:
        return PER_SAMPLE_DIM
    return {name: dim for name, dim in PER_SAMPLE_DIM.items() if name != "encoder_hidden_states"}


def select_samples(traj: Trajectory, index: torch.Tensor) -> Trajectory:
    """The chains of samples `index` (a 1-D index tensor) of `traj`, as a Trajectory of their own."""
    index = torch.as_tensor(index, device=traj.latents.device)
    picked = {name: None if getattr(traj, name) is None else getattr(traj, name).index_select(dim, index)
              for name, dim in _sample_dims(traj).items()}
    return dataclasses.replace(traj, **picked)


def concat_samples(trajs: Sequence[Trajectory]) -> Trajectory:
    """One Trajectory holding the samples of `trajs` (same schedule, model and guidance) side by side."""
    first = trajs[0]
    for other in trajs[1:]:
        same = (other.eta == first.eta and other.guidance_scale == first.guidance_scale
                and other.model_key == first.model_key and other.schedule.equal(first.schedule))
        if not same:
            raise ValueError("concat_samples needs trajectories of one schedule, eta, guidance scale and model")
    joined = {}
    for name, dim in PER_SAMPLE_DIM.items():
        parts = [getattr(t, name) for t in trajs]
        if any(p is None for p in parts) and not all(p is None for p in parts):
            raise ValueError(f"concat_samples: {name} is set in some trajectories and not in others")
        joined[name] = None if parts[0] is None else torch.cat(parts, dim)
    if first.prompt_index is not None:  # each part's rows of distinct prompts follow the previous parts'
        offsets = torch.tensor([0] + [len(t.encoder_hidden_states) for t in trajs[:-1]]).cumsum(0)
        joined["prompt_index"] = torch.cat([t.prompt_index + int(o) for t, o in zip(trajs, offsets)], 1)
    return dataclasses.replace(first, **joined)


def trajectory_tensors(traj: Trajectory) -> tuple[dict[str, torch.Tensor], dict]:
    """A Trajectory as named tensors and JSON-ready values (for checkpoints); `trajectory_from` reverses it.
    The schedule's tables are stored under their own names."""
    tensors = {n: getattr(traj, n) for n in PER_SAMPLE_DIM if getattr(traj, n) is not None}
    tensors.update(traj.schedule.tables())
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    return tensors, {"eta": traj.eta, "guidance_scale": traj.guidance_scale, "model_key": traj.model_key}


def trajectory_from(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device | str = "cpu") -> Trajectory:
    per_sample = {n: tensors[n].to(device) if n in tensors else None for n in PER_SAMPLE_DIM}
    schedule = StepSchedule(**{n: tensors[n] for n in TABLES}).to(device)
    return Trajectory(**per_sample, schedule=schedule, **meta)


def model_key(model: torch.nn.Module) -> str:
    """Fingerprint of a model's architecture (parameter names and shapes, adapters excluded)."""
    h = hashlib.sha1(type(model).__name__.encode())
    for name, p in model.named_parameters():
        if "lora_" not in name:
            h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def step_conditioning(cond: Optional[torch.Tensor], prompt_index: Optional[torch.Tensor],
                      ks: torch.Tensor) -> Optional[torch.Tensor]:
    """What steps `ks` (n,) are conditioned on, stacked step-major: (n * B, L, D), or None.

    Per-sample conditioning (B, L, D) is the same at every step; with `prompt_index` (T, B) each
    (step, sample) picks its row of `cond` (P, L, D).
    """
    if cond is None:
        return None
    if prompt_index is None:
        return cond.repeat(len(ks), 1, 1)
    return cond[prompt_index[ks].flatten()]


def _model_output(model, sample, timestep, encoder_hidden_states) -> torch.Tensor:
    out = family_of(model).call(model, sample, timestep, encoder_hidden_states)
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


def _check_latents(model, latents: torch.Tensor) -> None:
    if not torch.is_tensor(latents):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    _check_float("latents", latents)
    layout = family_of(model).latent_layout
    in_channels = family_of(model).latent_channels(model)
    if layout is not None and latents.dim() != len(layout):
        names = ", ".join(str(in_channels) if d == "channels" and in_channels else d for d in layout)
        raise ValueError(f"{type(model).__name__} takes latents ({names}), got shape {tuple(latents.shape)} "
                         f"(rank {latents.dim()})")
    if latents.dim() < 2:
        raise ValueError(f"latents must have a batch dimension, got shape {tuple(latents.shape)}")
    if in_channels is not None and latents.shape[1] != in_channels:
        raise ValueError(f"latents have {latents.shape[1]} channels but the model expects "
                         f"{in_channels}: shape {tuple(latents.shape)}")


def _check_prompt_index(prompt_index, cond: torch.Tensor, num_steps: int, batch: int) -> torch.Tensor:
    if not torch.is_tensor(prompt_index) or prompt_index.is_floating_point() or prompt_index.is_complex() \
            or prompt_index.dtype == torch.bool:
        raise TypeError(f"prompt_index must be an integer tensor (num_steps, batch), got "
                        f"{getattr(prompt_index, 'dtype', type(prompt_index).__name__)}")
    if prompt_index.shape != (num_steps, batch):
        raise ValueError(f"prompt_index must have shape (num_steps, batch) = ({num_steps}, {batch}), got "
                         f"{tuple(prompt_index.shape)}")
    if prompt_index.numel() and not 0 <= int(prompt_index.min()) <= int(prompt_index.max()) < cond.shape[0]:
        raise ValueError(f"prompt_index values must index the {cond.shape[0]} embeddings of "
                         f"encoder_hidden_states, got values in [{int(prompt_index.min())}, {int(prompt_index.max())}]")
    return prompt_index.to(device=cond.device, dtype=torch.int64)


def check_rollout_args(model, sampler: Sampler, latents, num_steps, eta, guidance_scale, encoder_hidden_states,
                       negative_encoder_hidden_states, prompt_index=None):
    """Validate a rollout's arguments; returns the conditioning broadcast to the batch (the
    embeddings as given with `prompt_index`), the negative conditioning and the prompt index."""
    _check_latents(model, latents)
    sampler.check(num_steps, eta)
    if guidance_scale != 1.0 and negative_encoder_hidden_states is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs negative_encoder_hidden_states "
                         "(the unconditional / negative-prompt embeddings)")
    batch = latents.shape[0]
    if prompt_index is None:
        cond = _batch_cond("encoder_hidden_states", encoder_hidden_states, batch)
    else:
        if not torch.is_tensor(encoder_hidden_states):
            raise ValueError("prompt_index needs encoder_hidden_states: the (P, L, D) embeddings it indexes, "
                             f"got {type(encoder_hidden_states).__name__}")
        cond = _batch_cond("encoder_hidden_states", encoder_hidden_states, encoder_hidden_states.shape[0])
        prompt_index = _check_prompt_index(prompt_index, cond, num_steps, batch)
    negative = _batch_cond("negative_encoder_hidden_states", negative_encoder_hidden_states, batch)
    if negative is not None and cond is None:
        raise ValueError("negative_encoder_hidden_states given without encoder_hidden_states")
    for conditioning in (cond, negative):
        family_of(model).check_conditioning(model, conditioning)
    return cond, negative, prompt_index


def step_noises(latents: torch.Tensor, num_steps: int, generator=None, noises=None) -> torch.Tensor:
    """Every step's standard normal noise (T, B, ...): `noises` when given (checked and moved to the
    latents), else drawn from `generator` on its own device."""
    shape = (num_steps,) + tuple(latents.shape)
    if noises is None:
        device = latents.device if generator is None else generator.device
        return torch.randn(shape, generator=generator, device=device, dtype=latents.dtype).to(latents.device)
    if not torch.is_tensor(noises) or tuple(noises.shape) != shape:
        raise ValueError(f"noises must be a tensor of shape {shape} (num_steps, *latents.shape), got "
                         f"{tuple(noises.shape) if torch.is_tensor(noises) else type(noises).__name__}")
    return noises.to(latents.device, latents.dtype)


@torch.no_grad()
def rollout(model, sampler, latents, *, num_steps: int, eta: float, encoder_hidden_states=None,
            guidance_scale: float = 1.0, negative_encoder_hidden_states=None, prompt_index=None, generator=None,
            noises=None, progress: bool = False, split_cfg: bool = False, backend: str = "auto",
            store_x0_hat: bool = False) -> Trajectory:
    """Sample x_T -> x_0 under no grad and store the chain.

    `sampler` is a `rlr_fast.samplers.Sampler`, or a diffusers `DDIMScheduler` (sampled with DDIM;
    this calls its `set_timesteps(num_steps)`). `latents` is x_T: (B, C, H, W) for an image UNet,
    (B, C, F, H, W) for a video UNet (F frames), any shape with a leading batch dimension for other
    models. Noise for every step is drawn with `generator`, or given as `noises` (T, B, ...) (the
    training loop draws each sample's from its own generator).
    `encoder_hidden_states` is (B, L, D) (or (1, L, D), shared), or with `prompt_index` (T, B) one
    embedding per distinct prompt (P, L, D): step k of sample b is conditioned on row
    prompt_index[k, b] (`rlr_fast.prompts.step_conditioning` builds both from a prompt schedule).
    `store_x0_hat` also keeps each step's Tweedie estimate of x_0 (T more latents per sample), which
    `baseline="value"` scores; it costs no model call.
    """
    sampler = as_sampler(sampler)
    cond, negative, prompt_index = check_rollout_args(model, sampler, latents, num_steps, eta, guidance_scale,
                                                      encoder_hidden_states, negative_encoder_hidden_states,
                                                      prompt_index)
    batch, device, dtype = latents.shape[0], latents.device, latents.dtype
    schedule = sampler.schedule(num_steps, eta)
    xs = latents.new_empty((num_steps + 1,) + tuple(latents.shape))
    noises = step_noises(latents, num_steps, generator, noises)
    log_probs = latents.new_empty((num_steps, batch), dtype=log_density_dtype(dtype))
    x0_hat = torch.empty_like(xs[1:]) if store_x0_hat else None
    xs[0] = latents
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="rollout", leave=False)
    for k in steps:
        t = schedule.timesteps[k].to(device)
        cond_k = cond if prompt_index is None else step_conditioning(cond, prompt_index, k)
        out, out_cond = predict(model, xs[k], t, cond_k, negative, guidance_scale, split_cfg)
        per = [v[k].expand(batch).to(device) for v in (schedule.c_x, schedule.c_e, schedule.sigmas)]
        prev, _, logp = ddim_step(xs[k], out, noises[k], *per, model_output_cond=out_cond,
                                  guidance_scale=guidance_scale, backend=backend)
        xs[k + 1] = prev
        log_probs[k] = logp
        if x0_hat is not None:
            # the guided prediction, the one the chain follows: its x0_hat is where the sampled chain
            # heads (any function of x_t keeps a baseline unbiased; the choice only moves the variance)
            e = out if out_cond is None else out + guidance_scale * (out_cond - out)
            x0_hat[k] = float(schedule.d_x[k]) * xs[k] + float(schedule.d_e[k]) * e
    return Trajectory(latents=xs, noises=noises, schedule=schedule.to(device), log_probs=log_probs, eta=float(eta),
                      encoder_hidden_states=cond, negative_encoder_hidden_states=negative, prompt_index=prompt_index,
                      guidance_scale=float(guidance_scale), model_key=model_key(model), x0_hat=x0_hat)


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
    return (flat, traj.timesteps[idx].repeat_interleave(b), traj.step_conditioning(idx),
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
