"""One optimizer step of fine-tuning, and how a method may take several steps per sampled batch.

A step: prompts and noise drawn, a rollout (replayed from a CUDA graph on a GPU), the reward
through the VAE, the gradient estimate accumulated over micro-batches and clipped, then AdamW with
warm-up. The loop (rlr_fast.train) does not know which method it runs; it asks the run's
`StepMethod` for each step's gradient, given the method's state as of the last committed step:

    grads = method.step(state)           # changes nothing but .grad and the generators
    record = apply(cfg, step, grads, optimizer)
    state = grads.state                  # committed with the update; checkpoints store it

so a step stopped before `apply` leaves no trace. `step` is the method's `gradients` plus the policy
metrics of what it sampled (`StepContext.policy_metrics`: the chains' KL to the base model and the
images' diversity within a prompt, logged next to the reward for every method). `OnPolicy` (every
method but ddpo, and sqdf with a replay buffer) samples fresh batches for every step; its only state
is the running value fit of baseline='value' (rlr_fast.baselines.ValueStatistics). A method that
takes several optimizer steps per sampled batch, or keeps anything across steps (DDPO's stored epoch
and per-prompt reward history, rlr_fast.ddpo; SQDF's replay buffer, rlr_fast.replay), subclasses
`StepMethod` and is named in `rlr_fast.methods.step_method`. Its state is a `MethodState`: never changed in place (a
step returns a new one, sharing unchanged tensors), and written to checkpoints as tensors + JSON
(`to_checkpoint`, read back by `load_state`), so a run
resumes bit-exactly at any step, mid-epoch included.

A micro-batch is drawn so that it is the same at any number of ranks: the "sampling" generator
draws the global micro-batch's prompt ids and one seed, and each sample's x_T and step noises come
from its own generator seeded from that seed and the sample's global index (`draw_micro_batch`);
each rank rolls out its share, and `StepContext.average_and_clip` averages the ranks' gradients
(rlr_fast.distributed). DDPO and SQDF's replay keep per-run state that is not sharded: they run on
one process.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np
import torch

from .baselines import ValueStatistics
from .config import Config
from .options import EstimatorOptions
from .cuda_graph import GraphedRollout
from .distributed import Ranks, sample_seeds
from .estimators import estimate
from .inference import autocast, chain_dtype, latent_shape
from .metrics import diversity, jsonable
from .models import SDModels
from .profiling import nvtx_range
from .prompts import PromptBank
from .rewards import Reward, VideoReward, latent_reward, video_latent_reward
from .rollout import Trajectory, rollout
from .scoring import NonFiniteRewards, chain_rewards
from .sqdf import chain_kl
from .video import is_video_unet


def draw_prompt_ids(num_prompts: int, batch_size: int, images_per_prompt: int,
                    generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) prompt indices: batch_size / images_per_prompt distinct prompts (when there
    are enough), each repeated images_per_prompt times, for per-prompt baselines."""
    groups = batch_size // images_per_prompt
    if groups <= num_prompts:
        chosen = torch.randperm(num_prompts, generator=generator)[:groups]
    else:
        chosen = torch.randint(num_prompts, (groups,), generator=generator)
    return chosen.repeat_interleave(images_per_prompt)


def sample_noise(shape: tuple[int, ...], num_steps: int, seeds: list[int], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T (B, *shape) and every step's noise (T, B, *shape) in `dtype`, sample b drawn in float32 on the
    CPU from a generator of its own seeded `seeds[b]`: a sample's noise does not depend on the others',
    and a float64 run draws the float32 run's noises."""
    x_T, noises = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        x_T.append(torch.randn(shape, generator=generator, dtype=torch.float32))
        noises.append(torch.randn((num_steps, *shape), generator=generator, dtype=torch.float32))
    return torch.stack(x_T).to(device, dtype), torch.stack(noises, dim=1).to(device, dtype)


def draw_micro_batch(cfg: Config, num_prompts: int, models: SDModels, generator: torch.Generator, ranks: Ranks,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of a global micro-batch of `cfg.batch_size`: its prompt ids (b,), x_T and
    step noises (`sample_noise`) at cfg.resolution (and cfg.num_frames for a video UNet).
    `generator` advances the same on every rank and at any world size."""
    ids = draw_prompt_ids(num_prompts, cfg.batch_size, cfg.images_per_prompt, generator)
    seed = int(torch.randint(2**63 - 1, (), generator=generator))
    mine = ranks.share(cfg.batch_size)
    shape = latent_shape(models.unet, models.latent_hw(cfg.resolution), cfg.num_frames)
    x_T, noises = sample_noise(shape, cfg.num_steps, sample_seeds(seed, range(cfg.batch_size)[mine]), device,
                               chain_dtype(models.unet))
    return ids[mine], x_T, noises


class TrainingRollout:
    """The loop's rollout: replayed from a CUDA graph on a GPU (rlr_fast.cuda_graph), eager otherwise.

    `kind` ("cuda_graph" or "eager") and `reason` (why eager) are recorded in every metrics record
    and the summary. A graph that fails (capture, memory) falls back to eager for the rest of the
    run with a one-line reason, rolling out the failed rollout's noise again.
    """

    def __init__(self, cfg: Config, models: SDModels, device: torch.device):
        self.models, self.split_cfg, self.backend = models, cfg.split_cfg, cfg.backend
        self.store_x0_hat = cfg.needs_x0_hat  # never with method=auto: designs do not use the value baseline
        self.graphed, self.kind, self.reason = None, "eager", None
        if cfg.rollout == "eager":
            self.reason = "rollout='eager' was asked for"
        elif self.store_x0_hat:  # Config refuses rollout='cuda_graph' with it
            self.reason = "baseline='value' needs each step's x0 estimate, which the CUDA-graph rollout does not store"
        elif cfg.rollout == "auto" and device.type != "cuda":
            self.reason = f"device is {device.type} (CUDA graphs need a GPU)"
        else:
            self.graphed, self.kind = GraphedRollout(models.unet, models.scheduler, split_cfg=cfg.split_cfg,
                                                     backend=cfg.backend), "cuda_graph"

    def __call__(self, x_T: torch.Tensor, noises: torch.Tensor, **kwargs):
        """The chain from x_T with the given step `noises` (T, B, ...); kwargs as `rollout`'s."""
        if self.graphed is not None:
            try:
                return self.graphed(x_T, noises=noises, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure of the graph path falls back to the eager one
                first_line = (str(e).splitlines() or [""])[0]
                self.graphed, self.kind = None, "eager"
                self.reason = f"CUDA graph failed: {type(e).__name__}: {first_line}"
                print(f"rollout: eager from now on ({self.reason})", file=sys.stderr)
        return rollout(self.models.unet, self.models.scheduler, x_T, noises=noises, split_cfg=self.split_cfg,
                       backend=self.backend, store_x0_hat=self.store_x0_hat, **kwargs)


# estimate's stats that count work: summed over an update's micro-batches
COUNTS = ("unet_forward", "unet_backward", "unet_steps", "reward_forward", "reward_backward", "value_fallbacks")


# What a step costs, in the units of docs/estimator.md §7: images the reward scored (every one, value-baseline
# proxies and records included; those whose dR/dx0 was taken; those the objective takes), and model
# evaluations of one sample at one step (forward; backward), the rollouts' included.
COST_KEYS = ("reward_images", "reward_backward_images", "reward_queries", "unet_forward_samples",
             "unet_backward_samples")


@dataclass
class Gradients:
    """What one optimizer step produced: .grad is accumulated on the LoRA parameters."""

    rewards: list[float]  # rewards of the samples this step drew (none when it reused stored samples)
    stats: dict  # the last estimate's stats, model-call counts summed over the step's estimates
    skipped: Optional[str]  # "reward" or "gradient" when the update must not be applied
    grad_norm: Optional[float]
    state: Any = None  # the method's state after this step (committed with it)
    cost: dict = field(default_factory=lambda: dict.fromkeys(COST_KEYS, 0))
    policy: dict = field(default_factory=dict)  # kl, diversity of what it sampled (StepContext.policy_metrics)


class MethodState(Protocol):
    """State a method keeps across optimizer steps. Never changed in place: a step returns a new one."""

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON-ready values that `StepMethod.load_state` turns back into this state."""


class _ImageTap(Reward):
    """The image reward, keeping the diversity of the images of its first call: a batch's x_0, which
    every method scores before anything else it scores (sqdf's soft Q included)."""

    def __init__(self, reward: Reward, prompt_ids: torch.Tensor):
        super().__init__()
        self.inner, self.prompt_ids = reward, prompt_ids
        self.diversity: Optional[float] = None
        self.seen = False

    @property
    def differentiable(self) -> bool:
        return self.inner.differentiable

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if not self.seen:
            # a video reward scores its frames as images: a sample's frames together are its image here
            self.seen, self.diversity = True, diversity(images.reshape(len(self.prompt_ids), -1), self.prompt_ids)
        return self.inner(images, prompts)


class _VideoTap(_ImageTap, VideoReward):
    """`_ImageTap` of a video reward: checked and scored as a video, each sample's frames one "image"."""


def sample_batch(cfg: Config, models: SDModels, bank: PromptBank, rollout_fn: TrainingRollout,
                 generator: torch.Generator, device: torch.device, dtype: torch.dtype,
                 ranks: Ranks = Ranks()) -> tuple[torch.Tensor, Trajectory]:
    """This rank's share of one micro-batch as training draws it from `generator` (`draw_micro_batch`):
    its prompt ids and its rollout at the run's resolution (and frames)."""
    ids, x_T, noises = draw_micro_batch(cfg, len(bank.prompts), models, generator, ranks, device)
    with nvtx_range("rollout"), autocast(device, dtype):
        traj = rollout_fn(x_T, noises, num_steps=cfg.num_steps, eta=cfg.eta, **bank.batch(ids, cfg.guidance_scale))
    return ids, traj


def batch_reward(cfg: Config, models: SDModels, bank: PromptBank, reward: Reward, ids: torch.Tensor):
    """The reward of prompts `ids` on x_0 latents (B, ...) -> (B,): decoded by the VAE in chunks, frame
    by frame for video."""
    to_latent = video_latent_reward if is_video_unet(models.unet) else latent_reward
    return to_latent(models.vae, reward, [bank.prompts[i] for i in ids], decode_chunk=cfg.decode_chunk,
                     checkpoint_vae=cfg.checkpoint_vae)


@dataclass
class StepContext:
    """What every method's optimizer step reads: the run's config, models, prompts, reward, rollout,
    trainable parameters, generators ("sampling": prompts and noise; "estimator": the estimator's
    own draws), device and dtype."""

    cfg: Config
    models: SDModels
    bank: PromptBank
    reward: Reward
    rollout: TrainingRollout
    params: list
    generators: dict
    device: torch.device
    dtype: torch.dtype
    ranks: Ranks = field(default_factory=Ranks)  # a data-parallel run's processes (one by default)
    # per batch sampled since the last `policy_metrics`: its chains' KL estimates and its image tap
    sampled: list = field(default_factory=list)
    # the estimator options of `cfg`, built and validated once per config (method=auto swaps the config)
    built_options: Optional[tuple[Config, EstimatorOptions]] = field(default=None, repr=False)

    @property
    def options(self) -> EstimatorOptions:
        if self.built_options is None or self.built_options[0] is not self.cfg:
            self.built_options = (self.cfg, self.cfg.estimator_options())
        return self.built_options[1]

    def sample(self, cost: dict) -> tuple[torch.Tensor, Trajectory, callable]:
        """One rollout batch (this rank's share): its prompt ids, its chain and its reward (x0 latents ->
        (B,)); the rollout's model evaluations are added to `cost` (not the KL metric's two, `policy_metrics`)."""
        ids, traj = sample_batch(self.cfg, self.models, self.bank, self.rollout, self.generators["sampling"],
                                 self.device, self.dtype, self.ranks)
        cost["unet_forward_samples"] += traj.num_steps * traj.batch_size
        tap = (_VideoTap if isinstance(self.reward, VideoReward) else _ImageTap)(self.reward, ids)
        self.sampled.append((self._chain_kl(traj), tap))
        return ids, traj, self.reward_fn(ids, tap)

    def sample_scored(self, cost: dict) -> Optional[tuple[torch.Tensor, Trajectory, torch.Tensor]]:
        """`sample` with the batch's rewards R(x_0), scored once without grad (added to `cost`); None
        when a reward is NaN/Inf (the methods that store samples skip such a batch's step)."""
        ids, traj, reward_fn = self.sample(cost)
        cost["reward_queries"] += traj.batch_size
        cost["reward_images"] += traj.batch_size
        try:
            with autocast(self.device, self.dtype):
                rewards, _, _ = chain_rewards(reward_fn, traj, need_grad=False)
        except NonFiniteRewards:
            return None
        return ids, traj, rewards

    def reward_fn(self, ids: torch.Tensor, reward: Optional[Reward] = None):
        """The reward of prompts `ids` on x0 latents (decoded by the VAE): (B, ...) -> (B,)."""
        return batch_reward(self.cfg, self.models, self.bank, reward or self.reward, ids)

    def _chain_kl(self, traj: Trajectory) -> torch.Tensor:
        """Each chain's KL to the base model (rlr_fast.sqdf.chain_kl), its step drawn by a generator seeded
        from the sampling generator's state, so the metric moves no random stream of the run."""
        state = self.generators["sampling"].get_state().numpy().tobytes()
        seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 1
        with nvtx_range("kl metric"), autocast(self.device, self.dtype):
            return chain_kl(self.models.unet, traj, torch.Generator().manual_seed(seed), self.options)

    def policy_metrics(self) -> dict:
        """Of the batches sampled since the last call: `kl`, the mean over their chains of the estimated
        KL(p_theta || p_base) of the whole chain, and `diversity`, the mean pairwise RMS distance of
        their x_0 images within each prompt (rlr_fast.metrics.diversity); None where nothing was sampled."""
        sampled, self.sampled = self.sampled, []
        spread = [tap.diversity for _, tap in sampled if tap.diversity is not None]
        return {"kl": float(torch.cat([kl for kl, _ in sampled]).mean()) if sampled else None,
                "diversity": float(np.mean(spread)) if spread else None}

    def estimate(self, traj: Trajectory, reward_fn, cost: dict, stats: dict, **kwargs) -> dict:
        """`estimate` on `traj` into .grad; its counts are added to `cost` and to the step's `stats`."""
        with nvtx_range("estimate"), autocast(self.device, self.dtype):
            micro = estimate(self.models.unet, traj, reward_fn, self.options,
                             generator=self.generators["estimator"], group=self.ranks, **kwargs)
        return self.count(micro, cost, stats)

    @staticmethod
    def count(micro: dict, cost: dict, stats: dict) -> dict:
        """An estimate's stats with its costs added to `cost` and its COUNTS to the step's `stats`'."""
        for key in COST_KEYS:
            cost[key] += micro[key]
        for key in COUNTS:  # work adds up over the step's estimates
            if key in micro:
                micro[key] += stats.get(key, 0)
        return micro

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def average_and_clip(self, estimates: int) -> float:
        """The accumulated .grad averaged over the ranks and divided by the number of `estimates`, clipped
        to max_grad_norm; its norm."""
        self.ranks.average_gradients(self.params)
        for p in self.params:
            if p.grad is not None:
                p.grad /= estimates
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))


class StepMethod:
    """Makes each optimizer step's gradient for the loop; see the module docstring."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    def initial_state(self) -> Optional[MethodState]:
        return None

    def gradients(self, state: Optional[MethodState]) -> Gradients:
        raise NotImplementedError

    def step(self, state: Optional[MethodState], cfg: Optional[Config] = None) -> Gradients:
        """`gradients(state)` with the policy metrics of the batches it sampled (before any update); `cfg`,
        when given, is this step's config from now on (method='auto': the current design applied)."""
        if cfg is not None:
            self.ctx.cfg = cfg
        grads = self.gradients(state)
        grads.policy = self.ctx.policy_metrics()
        return grads

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> Optional[MethodState]:
        """The state a checkpoint stored (`MethodState.to_checkpoint`)."""
        return None


class OnPolicy(StepMethod):
    """Every optimizer step samples `grad_accum` fresh batches and averages their estimates. Its state
    is the running value fit (baseline='value', value_fit='running'), None otherwise."""

    def initial_state(self) -> Optional[ValueStatistics]:
        return ValueStatistics() if self.ctx.cfg.needs_value_state else None

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> Optional[ValueStatistics]:
        state = self.initial_state()
        if state is not None:
            state.load_state_dict(tensors)
        return state

    def gradients(self, state: Optional[ValueStatistics] = None) -> Gradients:
        """The gradient of one optimizer step over `grad_accum` micro-batches, averaged and clipped.

        The running value fit is updated on a copy of `state`, returned as the step's state. A NaN/Inf
        reward or gradient marks the update skipped.
        """
        ctx = self.ctx
        ctx.zero_grad()
        rewards: list[float] = []
        stats: dict = {}
        cost = dict.fromkeys(COST_KEYS, 0)
        state = None if state is None else state.copy()
        for _ in range(ctx.cfg.grad_accum):
            ids, traj, reward_fn = ctx.sample(cost)
            try:
                stats = ctx.estimate(traj, reward_fn, cost, stats, prompt_ids=ids, value_state=state)
            except NonFiniteRewards:
                return Gradients(rewards, stats, "reward", None, state, cost=cost)
            rewards += stats["rewards"]
        grad_norm = ctx.average_and_clip(ctx.cfg.grad_accum)
        return Gradients(rewards, stats, None if math.isfinite(grad_norm) else "gradient", grad_norm, state,
                         cost=cost)


def learning_rate(cfg: Config, step: int) -> float:
    """The lr of optimizer step `step` (from 0): a linear warm-up over warmup_steps, then lr, or with
    lr_scheduler="cosine" a half cosine from lr down to 0 at train_steps. A function of the step alone, so a
    resumed run goes on along the same curve."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.lr_scheduler == "cosine":
        start = min(cfg.warmup_steps, cfg.train_steps - 1)
        progress = min(max(step - start, 0) / max(cfg.train_steps - start, 1), 1.0)
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def apply(cfg: Config, step: int, grads: Gradients, optimizer: torch.optim.Optimizer) -> dict:
    """Apply one update (unless skipped) at the step's learning rate; returns its metrics record."""
    lr = learning_rate(cfg, step)
    if grads.skipped is None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        with nvtx_range("optimizer step"):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    values = np.array(grads.rewards) if grads.rewards and not grads.skipped else None
    estimator = {k: v for k, v in grads.stats.items() if k not in ("rewards", "reward_mean", "reward_std") + COST_KEYS}
    return jsonable({
        "step": step + 1,
        "reward_mean": None if values is None else float(values.mean()),
        "reward_std": None if values is None else float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "kl": grads.policy.get("kl"), "diversity": grads.policy.get("diversity"),
        "grad_norm": grads.grad_norm, "lr": lr,
        "skipped": grads.skipped or False, **grads.cost, "estimator": estimator,
    })


def design_estimator(cfg: Config, models: SDModels, bank: PromptBank, reward: Reward, rollout_fn: TrainingRollout,
                     generator: torch.Generator, device: torch.device, dtype: torch.dtype):
    """method='auto': the estimator rlr_fast.design chooses from cfg.design_pilots pilot batches, drawn as
    training batches are but from `generator` (the training batches stay those of any fixed method)."""
    from .design import Pilot, design

    def pilot() -> Pilot:
        ids, traj = sample_batch(cfg, models, bank, rollout_fn, generator, device, dtype)
        return Pilot(traj, batch_reward(cfg, models, bank, reward, ids), ids)

    with nvtx_range("design"), autocast(device, dtype):
        return design(models.unet, pilot, pilots=cfg.design_pilots, budget=cfg.design_budget, max_h=cfg.design_max_h,
                      max_memory_gb=cfg.max_memory_gb, config=cfg, differentiable=reward.differentiable, seed=cfg.seed)
