"""A fine-tuned LoRA against its base model on fixed prompts and seeds: `rlr-fast evaluate` and
finetune's `eval_every` (rlr_fast.eval_report writes and draws what this measures).

    evaluator = Evaluator(models, cfg, {"brightness": reward, "color_match": other}, prompts, seeds=[0, 1, 2, 3])
    result = evaluator()            # the base model's pass is kept: later calls sample the LoRA only

For every (prompt, seed) both samplers start from the same x_T and draw the same step noises
(`inference.sample_chain`), so their samples differ by the model alone. Reported, for each sampler
and for LoRA - base (paired: same prompt and seed), as mean, standard deviation and standard error:

* each reward, over the prompt x seed samples;
* diversity: the mean pairwise distance between the samples of one prompt (its seeds), over the
  prompts. In pixels it is the RMS distance (`metrics.diversity`, images in [0, 1]); in a feature
  space (the image network of the first reward that has one, `Reward.features`) the distance between
  unit-normalised embeddings (0: the same direction, sqrt(2): orthogonal);
* the KL divergence from the LoRA sampler to the base one along the chain. Each DDIM step k is a
  Gaussian transition with the same sigma_k for both, so given the state x_k
  KL_k = ||mu_lora(x_k) - mu_base(x_k)||^2 / (2 sigma_k^2) (summed over latent elements), and by the
  chain rule of KL the divergence between the two samplers' path measures (the joint laws of
  x_T, ..., x_0, x_T shared) is E over LoRA chains of sum_k KL_k. Each LoRA chain gives one unbiased
  sample of it (its x_k are the LoRA's own); the mean over chains +- its standard error estimates it,
  in nats. It bounds the KL between the two samplers' final latents from above (data processing).
  A deterministic step (sigma = 0, eta = 0) has no density: the path KL is then infinite unless the
  means agree, so such steps are left out and listed.

The samples of a prompt depend on the prompts batched with it (one generator per seed draws for
the whole batch), so a result is reproduced with the same prompts, seeds and batch size.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config
from .eval_report import draw_eval_curves
from .inference import DTYPES, autocast, decode_latents, progress, sample_chain
from .metrics import diversity, jsonable, read_metrics
from .models import SDModels
from .lora import has_lora, lora_disabled
from .prompts import PromptBank
from .rewards import Reward
from .rollout import Trajectory, recompute_steps
from .run_dir import atomic_write

# The side-by-side grid shows the first GRID_PROMPTS prompts x GRID_SEEDS seeds, cells at most GRID_CELL px.
GRID_PROMPTS, GRID_SEEDS, GRID_CELL = 8, 4, 256


@torch.no_grad()
def chain_kl(unet, traj: Trajectory, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(T, B) float64: KL_k = ||mu_lora(x_k) - mu_base(x_k)||^2 / (2 sigma_k^2) at every step k of
    every chain of `traj` (a chain of the UNet with its LoRA on), the base being the same UNet with
    the LoRA switched off; 0 at deterministic steps (sigma_k = 0), which have no KL."""
    stochastic = [k for k in range(traj.num_steps) if float(traj.sigmas[k]) > 0]
    kl = torch.zeros(traj.num_steps, traj.batch_size, dtype=torch.float64)
    if not stochastic:
        return kl
    with autocast(traj.latents.device, dtype):
        lora = [recompute_steps(unet, traj, [k])[0] for k in stochastic]
        with lora_disabled(unet):
            base = [recompute_steps(unet, traj, [k])[0] for k in stochastic]
    for k, mu_lora, mu_base in zip(stochastic, lora, base):
        squared = (mu_lora.double() - mu_base.double()).flatten(1).pow(2).sum(1)
        kl[k] = (squared / (2 * float(traj.sigmas[k]) ** 2)).cpu()
    return kl


def spread(values) -> dict:
    """n, mean, std (ddof 1) and standard error std / sqrt(n) of the finite values; `nonfinite`
    counts the others. std and stderr are None below two values, everything but n for none."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    n = len(finite)
    std = float(finite.std(ddof=1)) if n > 1 else None
    return {"n": n, "mean": float(finite.mean()) if n else None, "std": std,
            "stderr": std / math.sqrt(n) if std is not None else None, "nonfinite": int(len(values) - n)}


def pairwise_distance(samples: torch.Tensor) -> float:
    """Mean distance over the pairs of `samples` (S, ...) of one prompt: RMS over pixels for images,
    Euclidean for (S, D) unit-normalised embeddings; NaN below two samples."""
    rms = diversity(samples, torch.zeros(len(samples)))
    if rms is None:
        return math.nan
    return rms if samples.dim() > 2 else rms * math.sqrt(samples.shape[1])  # diversity divides by sqrt(D)


@dataclass
class Pass:
    """One sampler on the evaluation set; (S, P) arrays are seed-major, (P,) ones per prompt."""

    rewards: dict[str, np.ndarray]  # name -> (S, P)
    pixel_diversity: np.ndarray  # (P,), NaN with one seed
    feature_diversity: Optional[np.ndarray]  # (P,), None without a feature model
    kl: Optional[np.ndarray]  # (S, P) nats per chain; the LoRA pass only
    kl_per_step: Optional[np.ndarray]  # (T,) mean over chains
    deterministic_steps: list[int]  # steps with sigma = 0, left out of the KL
    grid: torch.Tensor  # (prompts, seeds, 3, h, w): the grid's images


class Evaluator:
    """Base model vs LoRA on fixed prompts and seeds (see the module docstring).

    `models.unet` must carry the LoRA (the base is the same UNet with it switched off); sampling
    follows `cfg` (steps, eta, guidance, negative prompt, resolution, dtype). `rewards` maps names to
    loaded rewards on the model's device. Prompts are encoded here, so the text encoder may be freed
    afterwards. `batch_size` prompts are sampled together.
    """

    def __init__(self, models: SDModels, cfg: Config, rewards: dict[str, Reward], prompts: list[str], seeds,
                 *, batch_size: int = 16):
        seeds = [int(s) for s in seeds]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if not prompts:
            raise ValueError("evaluation needs at least one prompt")
        if not seeds or repeated:
            raise ValueError(f"evaluation needs distinct seeds (a repeated seed repeats its samples), got {seeds}")
        if not rewards:
            raise ValueError("evaluation needs at least one reward")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not has_lora(models.unet):
            raise ValueError("evaluation compares a LoRA with its base model, but the UNet has no LoRA; load one "
                             "(rlr-fast evaluate --lora DIR, or rlr_fast.lora.load_lora)")
        self.models, self.cfg, self.rewards = models, cfg, dict(rewards)
        self.prompts, self.seeds, self.batch_size = list(prompts), seeds, batch_size
        self.feature_model = next((name for name, r in rewards.items() if type(r).features is not Reward.features),
                                  None)
        self.latent_hw = models.set_resolution(cfg.resolution)  # before encoding: SDXL's time ids follow it
        # per batch of prompts, their conditioning (a prompt_schedule's switches included)
        self.conds = [PromptBank(models, self.prompts[i:i + batch_size], cfg.negative_prompt, cfg.prompt_schedule,
                                 cfg.num_steps).conditioning(torch.arange(len(self.prompts[i:i + batch_size])))
                      for i in range(0, len(self.prompts), batch_size)]
        self.negative = models.encode_prompts([cfg.negative_prompt])
        self.base: Optional[Pass] = None

    def __call__(self, desc: str = "evaluate") -> dict:
        """The measures of the module docstring as a dict (see `summarize`); also keeps the grids'
        images (`self.grids`: base, LoRA). The base pass runs on the first call only."""
        if self.base is None:
            with lora_disabled(self.models.unet):
                self.base = self._pass(False, f"{desc}: base")
        lora = self._pass(True, f"{desc}: LoRA")
        self.grids = (self.base.grid, lora.grid)
        return summarize(self.base, lora, self.prompts, self.seeds, self.feature_model)

    def _pass(self, lora: bool, desc: str) -> Pass:
        cfg, models = self.cfg, self.models
        dtype, shape = DTYPES[cfg.dtype], (len(self.seeds), len(self.prompts))
        values = {name: np.empty(shape) for name in self.rewards}
        pixels = np.full(len(self.prompts), np.nan)
        features = np.full(len(self.prompts), np.nan) if self.feature_model else None
        kl, kl_sum, grid, deterministic = (np.empty(shape) if lora else None), 0.0, [], []
        starts = range(0, len(self.prompts), self.batch_size)
        with progress(len(starts) * len(self.seeds), desc, "batch") as bar:
            for start in starts:
                chunk = self.prompts[start:start + self.batch_size]
                where = slice(start, start + len(chunk))
                images, embeddings = [], []
                for i, seed in enumerate(self.seeds):
                    cond = self.conds[start // self.batch_size]
                    traj = sample_chain(models, cond["encoder_hidden_states"], self.negative, seed,
                                        num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                                        dtype=dtype, latent_hw=self.latent_hw, prompt_index=cond.get("prompt_index"),
                                        num_frames=cfg.num_frames)
                    x = decode_latents(models.vae, traj.x0)
                    deterministic = [k for k in range(traj.num_steps) if float(traj.sigmas[k]) == 0]
                    with torch.no_grad():
                        for name, reward in self.rewards.items():
                            values[name][i, where] = reward(x, chunk).double().cpu().numpy()
                        if self.feature_model:
                            embedding = self.rewards[self.feature_model].features(x)
                            embeddings.append(F.normalize(embedding.double(), dim=-1).cpu())
                    if lora:
                        per_step = chain_kl(models.unet, traj, dtype)
                        kl[i, where] = per_step.sum(0).numpy()
                        kl_sum = kl_sum + per_step.sum(1).numpy()
                    images.append(x.cpu())
                    bar.update(1)
                images = torch.stack(images, 1)  # (prompts of the chunk, seeds, 3, H, W), or (.., F, 3, H, W)
                for j in range(len(chunk)):
                    pixels[start + j] = pairwise_distance(images[j])
                    if features is not None:
                        features[start + j] = pairwise_distance(torch.stack([e[j] for e in embeddings]))
                grid.append(_thumbnails(images[:max(0, GRID_PROMPTS - start), :GRID_SEEDS]))
        return Pass(rewards=values, pixel_diversity=pixels, feature_diversity=features, kl=kl,
                    kl_per_step=kl_sum / kl.size if lora else None, deterministic_steps=deterministic,
                    grid=torch.cat(grid))


def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    """(P, S, 3, H, W) images shrunk (area average) to at most GRID_CELL pixels a side for the grid;
    of videos (P, S, F, 3, H, W), the middle frame."""
    if images.dim() == 6:
        images = images[:, :, images.shape[2] // 2]
    if not images.numel() or max(images.shape[-2:]) <= GRID_CELL:
        return images
    p, s = images.shape[:2]
    scale = GRID_CELL / max(images.shape[-2:])
    small = F.interpolate(images.flatten(0, 1), scale_factor=scale, mode="area")
    return small.reshape((p, s) + tuple(small.shape[1:]))


def _compare(base: np.ndarray, lora: np.ndarray) -> dict:
    return {"base": spread(base), "lora": spread(lora), "lora_minus_base": spread(lora - base)}


def summarize(base: Pass, lora: Pass, prompts: list[str], seeds: list[int], feature_model: Optional[str]) -> dict:
    """The result of an evaluation: per reward and per diversity measure {base, lora,
    lora_minus_base} (each `spread`, with per-prompt means under `per_prompt`), and the KL."""
    def per_prompt(values: np.ndarray) -> dict:
        means = values if values.ndim == 1 else values.mean(0)
        return {p: (float(v) if np.isfinite(v) else None) for p, v in zip(prompts, means)}

    def measure(b: np.ndarray, l: np.ndarray) -> dict:
        return {**_compare(b, l), "per_prompt": {"base": per_prompt(b), "lora": per_prompt(l)}}

    diversity_ = {"pixels": measure(base.pixel_diversity, lora.pixel_diversity), "features": None}
    if feature_model is not None:
        diversity_["features"] = {"model": feature_model,
                                  **measure(base.feature_diversity, lora.feature_diversity)}
    kl = {"lora": spread(lora.kl), "per_step": [float(v) for v in lora.kl_per_step],
          "deterministic_steps": lora.deterministic_steps, "unit": "nats"}
    if len(lora.deterministic_steps) == len(lora.kl_per_step):
        kl = {"lora": None, "reason": "every step is deterministic (eta = 0): the samplers' path measures have no "
                                      "density, so their KL is infinite unless the chains coincide"}
    return {"prompts": list(prompts), "seeds": list(seeds), "samples": len(prompts) * len(seeds),
            "rewards": {name: measure(base.rewards[name], lora.rewards[name]) for name in base.rewards},
            "diversity": diversity_, "kl": kl}


def compact(result: dict) -> dict:
    """A result without its per-prompt and per-step detail and lists: what eval.jsonl records per step."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("per_prompt", "per_step", "prompts")}
        return value

    return strip({k: v for k, v in result.items() if k != "seeds"})


class RunEvaluation:
    """finetune's `eval_every`: an Evaluator on the config's small evaluation set (the held-out set of
    its prompts unless eval_prompts names one, the first eval_num_prompts, eval_seeds), scoring the
    trained reward and eval_rewards. One record per evaluated step goes to eval.jsonl (kept up to the
    checkpoint a run resumes from, so a resumed run's records are those of one uninterrupted run) and
    eval_curve.png. The base model's pass runs once per session. Draws from no generator of the run."""

    def __init__(self, cfg: Config, models: SDModels, reward: Reward, device: torch.device):
        from .presets import eval_prompts_of, load_prompts
        from .rewards import get_reward, get_video_reward
        from .video import is_video_unet

        self.every = cfg.eval_every
        self.prompt_set = eval_prompts_of(cfg.prompts)[0] if cfg.eval_prompts is None else cfg.eval_prompts
        prompts = load_prompts(self.prompt_set)[:cfg.eval_num_prompts]
        rewards = {cfg.reward if isinstance(cfg.reward, str) else "reward": reward}
        load = get_video_reward if is_video_unet(models.unet) else get_reward
        for name in cfg.eval_rewards:
            if name not in rewards:
                rewards[name] = load(name, **cfg.eval_reward_kwargs.get(name, {})).to(device)
        self.evaluator = Evaluator(models, cfg, rewards, prompts, cfg.eval_seeds, batch_size=len(prompts))
        self.records: list[dict] = []

    def start(self, out: Path, step: int) -> None:
        """Continue out/eval.jsonl from its records up to `step` (the resumed checkpoint's; 0 afresh)."""
        self.path, self.curve = out / "eval.jsonl", out / "eval_curve.png"
        self.records = read_metrics(self.path, keep_until=step)
        self._write()

    def __call__(self, step: int, last: bool = False) -> None:
        """Evaluate at `step` when it is due (step 0, every `eval_every`, the `last`) and not yet recorded."""
        if (step % self.every and not last) or any(r["step"] == step for r in self.records):
            return
        started = time.perf_counter()
        result = self.evaluator(desc=f"evaluate (step {step})")
        self.records.append(jsonable({"step": step, "prompt_set": self.prompt_set, **compact(result),
                                      "seconds": time.perf_counter() - started}))
        self._write()

    def _write(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        if self.records:
            draw_eval_curves(self.records, self.curve)
