"""Rollouts replayed from a CUDA graph: one captured step, replayed T times.

At the batch sizes of reward fine-tuning (1-4 samples) a UNet call is hundreds of small kernels,
and on a fast GPU much of a step is spent launching them. A CUDA graph launches the whole step
(UNet call(s) + the fused DDIM step) at once. The step's timestep and its coefficients
(c_x, c_e, sigma) live in static device tensors that are refilled before every replay, so ONE
graph serves all T steps and any `num_steps` / `eta` without recapture.

    graphed = GraphedRollout(unet, scheduler)              # captures on first call
    traj = graphed(x_T, num_steps=50, eta=1.0, encoder_hidden_states=cond,
                   negative_encoder_hidden_states=uncond, guidance_scale=7.5, generator=g)

returns the same `Trajectory` as `rlr_fast.rollout` with the same arguments: the noises are drawn
the same way from `generator` and every step runs the same ops on the same values. The only
difference allowed is the library's choice of kernels during capture (cuBLAS / cuDNN may pick
other algorithms under capture), so the results agree to a tolerance, not bitwise: relative
1e-4 of the latents' scale in float32, 1e-2 in float16 (`TOLERANCE`, checked by
tests/test_cuda_graph.py on a GPU).

What a graph assumes: the same latent / prompt-embedding shapes, dtype, guidance scale and
device, and parameters that stay where they are (an optimizer updating LoRA weights in place is
fine; `load_lora` or `.to()` moves them, and the next call recaptures). A change in any of those
recaptures automatically.

`GraphedRollout(..., capture=False)` runs exactly the step function that would be captured, on
its static buffers, but eagerly, on any device: that is how the CPU tests check its logic.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .ddim import ddim_step, log_density_dtype
from .profiling import nvtx_range
from .rollout import Trajectory, check_rollout_args, model_key, predict, step_conditioning, step_noises
from .samplers import as_sampler

# max |graph - eager| / max |eager| over the stored latents, by dtype
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


class StaticStep:
    """One DDIM step reading and writing fixed tensors: the function a CUDA graph captures.

    Inputs (refilled by `load` before each step): the sample x_t, the 0-dim timestep (in the sampler's
    timestep dtype), the
    per-sample coefficients c_x, c_e, sigma (float64, as `rollout` passes them) and the step's
    noise; the prompt embeddings are filled once per rollout by `set_conditioning` (before every
    step under a prompt schedule). `run()` returns (prev_sample, log_prob); under capture these
    become the graph's static outputs.
    """

    def __init__(self, model, latents: torch.Tensor, cond: Optional[torch.Tensor], negative: Optional[torch.Tensor],
                 guidance_scale: float, split_cfg: bool, backend: str, timestep_dtype: torch.dtype):
        batch, device = latents.shape[0], latents.device
        self.model = model
        self.guidance_scale = guidance_scale
        self.split_cfg = split_cfg
        self.backend = backend
        self.sample = torch.empty_like(latents)
        self.noise = torch.empty_like(latents)
        self.timestep = torch.zeros((), dtype=timestep_dtype, device=device)
        self.c_x, self.c_e, self.sigma = (torch.zeros(batch, dtype=torch.float64, device=device) for _ in range(3))
        self.cond = None if cond is None else torch.empty_like(cond)
        self.negative = None if negative is None else torch.empty_like(negative)

    def set_conditioning(self, cond: Optional[torch.Tensor], negative: Optional[torch.Tensor]) -> None:
        for static, value in ((self.cond, cond), (self.negative, negative)):
            if static is not None:
                static.copy_(value)

    def load(self, sample: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor, c_x: torch.Tensor,
             c_e: torch.Tensor, sigma: torch.Tensor) -> None:
        """Fill the inputs of one step (coefficients are 0-dim and broadcast over the batch)."""
        self.sample.copy_(sample)
        self.noise.copy_(noise)
        self.timestep.copy_(timestep)
        self.c_x.copy_(c_x)
        self.c_e.copy_(c_e)
        self.sigma.copy_(sigma)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        out, out_cond = predict(self.model, self.sample, self.timestep, self.cond, self.negative,
                                self.guidance_scale, self.split_cfg)
        prev, _, log_prob = ddim_step(self.sample, out, self.noise, self.c_x, self.c_e, self.sigma,
                                      model_output_cond=out_cond, guidance_scale=self.guidance_scale,
                                      backend=self.backend)
        return prev, log_prob


def _capture(step: StaticStep, warmup: int) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]:
    """Warm up on a side stream (lazy inits, cuBLAS handles, autotuning happen outside the graph),
    then capture one step."""
    device = step.sample.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step.run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # autocast's weight-cast cache would hand the graph tensors freed at autocast exit; without the
    # cache the casts are captured and re-run on every replay (so in-place weight updates show)
    autocast = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
    with autocast, torch.cuda.graph(graph):
        outputs = step.run()
    return graph, outputs


class GraphedRollout:
    """`rlr_fast.rollout` with each step replayed from one CUDA graph (see the module docstring).

    model, sampler (a Sampler or a DDIMScheduler), split_cfg, backend: as for `rollout`. warmup: eager
    steps before capture.
    capture=False runs the same static-buffer step eagerly (any device; for tests and debugging).
    """

    def __init__(self, model, sampler, *, split_cfg: bool = False, backend: str = "auto", warmup: int = 3,
                 capture: bool = True):
        sampler = as_sampler(sampler)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager steps before capture), got {warmup!r}")
        self.model = model
        self.sampler = sampler
        self.split_cfg = split_cfg
        self.backend = backend
        self.warmup = warmup
        self.capture = capture
        self.captures = 0  # how many times a graph was captured (recaptures show up here)
        self._key = None
        self._step: Optional[StaticStep] = None
        self._replay: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None
        self._graph = None

    def _graph_key(self, latents, cond, negative, guidance_scale, timestep_dtype) -> tuple:
        shape = lambda t: None if t is None else (tuple(t.shape), t.dtype)  # noqa: E731
        params = tuple(p.data_ptr() for p in self.model.parameters())
        return (tuple(latents.shape), latents.dtype, latents.device, shape(cond), shape(negative),
                float(guidance_scale), timestep_dtype, torch.is_autocast_enabled("cuda"), params)

    def _prepare(self, latents, cond, negative, guidance_scale, timestep_dtype) -> StaticStep:
        key = self._graph_key(latents, cond, negative, guidance_scale, timestep_dtype)
        if key == self._key:
            return self._step
        self._graph = self._replay = None  # frees the old graph's memory pool before the new capture
        step = StaticStep(self.model, latents, cond, negative, guidance_scale, self.split_cfg, self.backend,
                          timestep_dtype)
        if self.capture:
            step.load(latents, torch.zeros_like(latents), torch.zeros((), dtype=timestep_dtype), *([torch.ones(())] * 3))
            step.set_conditioning(cond, negative)
            graph, outputs = _capture(step, self.warmup)
            self._graph = graph
            self._replay = lambda: (graph.replay(), outputs)[1]
            self.captures += 1
        else:
            self._replay = step.run
        self._step, self._key = step, key
        return step

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, *, num_steps: int, eta: float, encoder_hidden_states=None,
                 guidance_scale: float = 1.0, negative_encoder_hidden_states=None, prompt_index=None,
                 generator=None, noises=None, progress: bool = False) -> Trajectory:
        if self.capture and (not torch.is_tensor(latents) or latents.device.type != "cuda"):
            where = latents.device if torch.is_tensor(latents) else type(latents).__name__
            raise RuntimeError(f"CUDA-graph rollouts need latents on a CUDA device, got {where} "
                               f"(CUDA available: {torch.cuda.is_available()}); use rlr_fast.rollout, or "
                               "GraphedRollout(..., capture=False) to run the same step without a graph")
        cond, negative, prompt_index = check_rollout_args(self.model, self.sampler, latents, num_steps, eta,
                                                          guidance_scale, encoder_hidden_states,
                                                          negative_encoder_hidden_states, prompt_index)
        batch, device, dtype = latents.shape[0], latents.device, latents.dtype
        if guidance_scale == 1.0:
            negative_for_step = None  # predict() ignores it without guidance; keep the graph smaller
        else:
            negative_for_step = negative

        schedule = self.sampler.schedule(num_steps, eta).to(device)
        # given or drawn exactly as rlr_fast.rollout does, so the same generator gives the same chain
        noises = step_noises(latents, num_steps, generator, noises)
        xs = latents.new_empty((num_steps + 1,) + tuple(latents.shape))
        log_probs = latents.new_empty((num_steps, batch), dtype=log_density_dtype(dtype))
        xs[0] = latents

        # under a prompt schedule the static conditioning is one step's (B, L, D), refilled every step
        first = cond if prompt_index is None else step_conditioning(cond, prompt_index, 0)
        with nvtx_range("graphed rollout"):
            step = self._prepare(latents, first, negative_for_step, guidance_scale, schedule.timesteps.dtype)
            step.set_conditioning(first, negative_for_step)
            steps = range(num_steps)
            if progress:
                from tqdm.auto import tqdm
                steps = tqdm(steps, desc="rollout (CUDA graph)" if self.capture else "rollout", leave=False)
            for k in steps:
                with nvtx_range(f"step {k}"):
                    if prompt_index is not None:
                        step.set_conditioning(step_conditioning(cond, prompt_index, k), negative_for_step)
                    step.load(xs[k], noises[k], schedule.timesteps[k], schedule.c_x[k], schedule.c_e[k],
                              schedule.sigmas[k])
                    prev, log_prob = self._replay()
                    xs[k + 1].copy_(prev)
                    log_probs[k].copy_(log_prob)
        return Trajectory(latents=xs, noises=noises, schedule=schedule, log_probs=log_probs, eta=float(eta),
                          encoder_hidden_states=cond, negative_encoder_hidden_states=negative,
                          prompt_index=prompt_index, guidance_scale=float(guidance_scale),
                          model_key=model_key(self.model))


def rollout_cuda_graph(model, sampler, latents, *, num_steps: int, eta: float, encoder_hidden_states=None,
                       guidance_scale: float = 1.0, negative_encoder_hidden_states=None, prompt_index=None,
                       generator=None, noises=None, progress: bool = False, split_cfg: bool = False,
                       backend: str = "auto") -> Trajectory:
    """`rlr_fast.rollout` (same signature and result) with every step replayed from a CUDA graph.

    Captures once per call; to amortise the capture over many rollouts keep a `GraphedRollout`.
    """
    graphed = GraphedRollout(model, sampler, split_cfg=split_cfg, backend=backend)
    return graphed(latents, num_steps=num_steps, eta=eta, encoder_hidden_states=encoder_hidden_states,
                   guidance_scale=guidance_scale, negative_encoder_hidden_states=negative_encoder_hidden_states,
                   prompt_index=prompt_index, generator=generator, noises=noises, progress=progress)
