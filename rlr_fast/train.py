"""The fine-tuning loop: `finetune(config) -> Result`.

One update (design.md, "the flow of one update"):

    x_T -> rollout (no grad) -> reward via the VAE -> estimate(...) accumulates .grad
        -> (grad accumulation) -> clip -> AdamW with warm-up -> log, sample grid, checkpoint

Everything random draws from two CPU generators seeded by `config.seed` (one for prompts and
sampling noise, one for the estimator's j and subsampling), so a run is reproducible and a
checkpoint that stores their states (and every global RNG) resumes bit-exactly on the CPU.

Files in `out_dir`:
    config.yaml                        the resolved config
    metrics.jsonl                      one JSON object per optimizer step
    samples/step_NNNNNN.png            sample grids: fixed prompts (rows) x fixed seeds (columns)
    checkpoints/step_NNNNNN.safetensors   LoRA, optimizer, RNG states, step and config
    pytorch_lora_weights.safetensors   the final LoRA (StableDiffusionPipeline.load_lora_weights)
    reward_curve.png, summary.json     the reward per step, and the run's final numbers
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import safetensors
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from .config import PRESETS, Config, load_config, load_prompts
from .estimators import estimate
from .models import SDModels, add_lora, latent_size, load_lora, load_sd, lora_parameters, save_lora
from .profiling import enable_profiling, nvtx_range
from .rewards import Reward, get_reward, latent_reward
from .rollout import rollout

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHECKPOINT_FORMAT = 1
# Config keys that may change when a run resumes: they affect speed, memory, logging or length,
# not the numbers of the updates (device and memory options may change floating-point rounding).
RESUMABLE_CHANGES = {
    "preset", "out_dir", "overwrite", "resume", "train_steps", "sample_every", "sample_prompts", "sample_seeds",
    "checkpoint_every", "max_nonfinite", "profile", "tensorboard", "device", "max_memory_gb", "max_batch",
    "checkpoint_unet", "checkpoint_vae", "decode_chunk", "split_cfg", "free_text_encoder",
}
# Outputs of a run, removed when a run starts afresh with overwrite=True.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "samples", "checkpoints", "tensorboard", "reward_curve.png",
               "summary.json", "memory_plan.md", "pytorch_lora_weights.safetensors")


class NonFiniteError(RuntimeError):
    """Too many updates in a row were skipped for a NaN/Inf reward or gradient."""


@dataclass
class Result:
    """Where a run's outputs are and how it ended."""

    out_dir: Path
    lora_path: Path
    config_path: Path
    metrics_path: Path
    curve_path: Path
    checkpoint_path: Path
    grid_paths: list[Path] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # summary: see `summarize`


# ----------------------------------------------------------------------------------------------
# Setup


def resolve_device(cfg: Config) -> torch.device:
    """The torch device of a config, or a ValueError saying why it cannot be had."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={cfg.device!r} (preset {cfg.preset!r}) needs a CUDA GPU, but none is available "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a machine with a "
                "GPU, or choose the CPU with --preset demo or --set device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={cfg.device!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif cfg.dtype != "float32":
        raise ValueError(f"dtype={cfg.dtype!r} is for GPUs (autocast); on the CPU use dtype=float32")
    return device


def load_models(model: str, device: torch.device, dtype: torch.dtype) -> SDModels:
    """The embedded default model or a local diffusers Stable Diffusion folder."""
    if model == "default":
        from .default_model import load_default

        return load_default(dtype=dtype, device=device)
    return load_sd(model, dtype=dtype, device=device)


def prepare_out_dir(cfg: Config) -> Path:
    """Create `out_dir`; refuse a file, or an earlier run unless resuming or overwriting."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is an existing file; choose a directory")
    earlier = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if earlier and cfg.resume is None:
        if not cfg.overwrite:
            raise ValueError(f"out_dir {out} already holds a run ({', '.join(earlier)}); continue it with "
                             f"resume={str(out)!r} (--resume {out}), start afresh with overwrite=true, or "
                             "choose another out_dir")
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def plan_memory(cfg: Config, out: Path) -> Config:
    """`cfg` with the memory options `rlr_fast.plan` chooses to fit `max_memory_gb` (for the
    architectures in cfg.model's folder); the plan is written to out/memory_plan.md. A budget
    nothing fits is a ValueError (plan.PlanError)."""
    from .plan import plan

    chosen = plan(cfg)
    (out / "memory_plan.md").write_text(chosen.table(), encoding="utf-8")
    return cfg.with_overrides(chosen.config_overrides())


def load_reward(cfg: Config, device: torch.device) -> Reward:
    """The configured reward, on `device`; checks that it suits the estimator."""
    reward = get_reward(cfg.reward, **cfg.reward_kwargs).to(device)
    needs_dr = cfg.method in ("full_bp", "truncated_bp") or (cfg.method == "rlr" and cfg.first_order_steps > 0)
    if needs_dr and not reward.differentiable:
        raise ValueError(f"reward {cfg.reward!r} is not differentiable, but method={cfg.method!r} "
                         f"(first_order_steps={cfg.first_order_steps}) needs dR/dx0; use method='zo' or 'ddpo', "
                         "or method='rlr' with first_order_steps=0")
    return reward


class PromptBank:
    """Every prompt's text embedding, computed once, and the negative prompt's."""

    def __init__(self, models: SDModels, prompts: list[str], negative_prompt: str, chunk: int = 32):
        self.prompts = prompts
        self.cond = torch.cat([models.encode_prompts(prompts[i:i + chunk]) for i in range(0, len(prompts), chunk)])
        self.negative = models.encode_prompts([negative_prompt])

    def batch(self, ids: torch.Tensor, guidance_scale: float) -> dict:
        """rollout's conditioning keywords for prompts `ids`."""
        cond = self.cond[ids.to(self.cond.device)]
        negative = self.negative.expand(len(ids), -1, -1) if guidance_scale != 1.0 else None
        return dict(encoder_hidden_states=cond, negative_encoder_hidden_states=negative,
                    guidance_scale=guidance_scale)


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


def initial_noise(unet, batch: int, generator: torch.Generator, device: torch.device,
                  latent_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """x_T in float32 (latent_hw None: the UNet's native size)."""
    h, w = latent_hw or (unet.config.sample_size,) * 2
    return torch.randn((batch, unet.config.in_channels, h, w), generator=generator).to(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on a GPU when the weights are half precision; nothing otherwise."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], float32 (B, 3, H, W), of latents in the diffusion model's scale."""
    z = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
    return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def generate_images(models: SDModels, cond: torch.Tensor, negative: Optional[torch.Tensor], seeds, *,
                    num_steps: int, eta: float, guidance_scale: float, dtype: torch.dtype = torch.float32,
                    latent_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Images (len(seeds) * P, 3, H, W) in [0, 1] for P prompt embeddings `cond` (P, L, D), seed-major.

    Each seed draws x_T and the sampling noise of all P prompts from its own generator, so the
    images of a fixed (prompt list, seed) never change between calls.
    """
    device = models.unet.device
    images = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        x_T = initial_noise(models.unet, len(cond), generator, device, latent_hw)
        with autocast(device, dtype):
            traj = rollout(models.unet, models.scheduler, x_T, num_steps=num_steps, eta=eta,
                           encoder_hidden_states=cond, guidance_scale=guidance_scale,
                           negative_encoder_hidden_states=None if guidance_scale == 1.0 else
                           negative.expand(len(cond), -1, -1), generator=generator)
        images.append(decode_latents(models.vae, traj.x0).cpu())
    return torch.cat(images)


# ----------------------------------------------------------------------------------------------
# Pictures, drawn with PIL


def save_grid(images: torch.Tensor, rows: int, path: Path, min_cell: int = 128, pad: int = 2) -> Path:
    """Images (rows * cols, 3, H, W) in [0, 1], row-major, as one PNG with `pad` white pixels between
    them; small images are enlarged (nearest neighbour) to at least `min_cell` pixels so a 32 px
    sample stays visible. One image with min_cell=0, pad=0 is saved as it is."""
    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    canvas = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), "white")
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        tile = Image.fromarray(pixels[i]).resize((w * scale, h * scale), Image.NEAREST)
        r, c = divmod(i, cols)
        canvas.paste(tile, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def draw_reward_curve(steps: list[int], means: list[float], stds: list[float], path: Path,
                      size: tuple[int, int] = (720, 400)) -> Path:
    """Reward mean per step (dots), +- one std across the batch (bars), and a moving average (line)."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    if steps:
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        if high - low < 1e-12:
            low, high = low - 1, high + 1
        x_lo, x_hi = min(steps), max(max(steps), min(steps) + 1)

        def xy(step, value):
            x = left + (step - x_lo) / (x_hi - x_lo) * (width - left - right)
            y = top + (high - value) / (high - low) * (height - top - bottom)
            return x, y

        for step, m, s in zip(steps, means, stds):
            draw.line([xy(step, m - s), xy(step, m + s)], fill=(200, 210, 235))
        for step, m in zip(steps, means):
            x, y = xy(step, m)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(60, 90, 200))
        window = max(1, len(means) // 10)
        smooth = [float(np.mean(means[max(0, i - window + 1):i + 1])) for i in range(len(means))]
        draw.line([xy(s, m) for s, m in zip(steps, smooth)], fill=(220, 60, 40), width=2)
        for value in (low, (low + high) / 2, high):
            draw.text((4, xy(x_lo, value)[1] - 6), f"{value:.4g}", fill="black")
        draw.text((left, height - bottom + 8), f"step {x_lo}", fill="black")
        draw.text((width - right - 70, height - bottom + 8), f"step {x_hi}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 8), f"reward per step: batch mean (dots), +-1 std (bars), moving average of "
                         f"{max(1, len(means) // 10)} (line)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON (in the safetensors header) for the rest


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """Every RNG state the run reads: torch CPU and CUDA, numpy, python, and our generators."""
    state = {"torch_cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash leaves the old file or
    the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={"rlr_fast": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, *, step: int, cfg: Config, unet, optimizer: torch.optim.Optimizer,
                    rng: dict, counters: dict) -> Path:
    """LoRA weights, AdamW state, every RNG state, the step (which fixes the LR schedule) and the config."""
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    params = dict(unet.named_parameters())
    tensors = {f"lora/{n}": params[n].detach().cpu().contiguous() for n in names}
    opt = optimizer.state_dict()
    opt_scalars = {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars[f"{index}/{key}"] = value
    tensors["rng/torch_cpu"] = rng["torch_cpu"]
    for name, state in rng["generators"].items():
        tensors[f"rng/generator/{name}"] = state
    for i, state in enumerate(rng.get("cuda", [])):
        tensors[f"rng/cuda/{i}"] = state
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, gauss = rng["python"]
    meta = {
        "format": CHECKPOINT_FORMAT, "step": step, "config": cfg.to_dict(), "lora_names": names,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "rng": {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(python_state), gauss],
                "generators": sorted(rng["generators"]), "cuda_devices": len(rng.get("cuda", []))},
        "counters": counters,
    }
    _atomic_save(tensors, meta, path)
    return path


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest one of a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"resume={str(path)!r}: no such run directory or checkpoint file")
    found = sorted((path / "checkpoints").glob("step_*.safetensors"))
    if not found:
        raise FileNotFoundError(f"resume={str(path)!r}: {path / 'checkpoints'} holds no step_*.safetensors checkpoint")
    return found[-1]


def read_checkpoint_meta(path: Path) -> dict:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise ValueError(f"{path} is not an rlr_fast checkpoint (unreadable safetensors: {e})") from e
    if "rlr_fast" not in header:
        raise ValueError(f"{path} is not an rlr_fast checkpoint (no rlr_fast metadata)")
    meta = json.loads(header["rlr_fast"])
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {meta.get('format')}, this rlr_fast reads {CHECKPOINT_FORMAT}")
    return meta


def check_compatible(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse to resume a checkpoint with a config whose updates would differ."""
    current = cfg.to_dict()
    differ = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differ[:6])
        raise ValueError(f"cannot resume {path}: it was written by a run with another config ({detail}). "
                         f"Only {', '.join(sorted(RESUMABLE_CHANGES - {'preset', 'resume'}))} may change on resume")


def load_checkpoint(path: Path, unet, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Load LoRA and optimizer state in place; returns (meta, rng state for `restore_rng`)."""
    meta = read_checkpoint_meta(path)
    tensors = safetensors.torch.load_file(str(path))
    params = dict(unet.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if trainable != meta["lora_names"]:
        raise ValueError(f"{path} holds LoRA weights for other layers than this model's LoRA "
                         f"({len(meta['lora_names'])} vs {len(trainable)} tensors)")
    with torch.no_grad():
        for n in trainable:
            params[n].copy_(tensors[f"lora/{n}"])
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer"]["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    numpy_kind, pos, has_gauss, cached = meta["rng"]["numpy"]
    version, python_state, gauss = meta["rng"]["python"]
    rng = {
        "torch_cpu": tensors["rng/torch_cpu"],
        "numpy": (numpy_kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "python": (version, tuple(python_state), gauss),
        "generators": {name: tensors[f"rng/generator/{name}"] for name in meta["rng"]["generators"]},
    }
    if meta["rng"]["cuda_devices"]:
        rng["cuda"] = [tensors[f"rng/cuda/{i}"] for i in range(meta["rng"]["cuda_devices"])]
    return meta, rng


# ----------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.jsonl (one object per step) plus TensorBoard scalars when it is installed."""

    def __init__(self, out: Path, keep_until: Optional[int], tensorboard: bool):
        self.path = out / "metrics.jsonl"
        self.records: list[dict] = []
        if keep_until is not None and self.path.exists():  # resuming: drop steps after the checkpoint
            lines = self.path.read_text(encoding="utf-8").splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= keep_until]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _jsonable(value):
    if torch.is_tensor(value) or isinstance(value, np.generic):
        return value.tolist() if getattr(value, "ndim", 0) else value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    """This step's peak GPU memory allocated, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak * (1 if sys.platform == "darwin" else 1024))  # bytes on macOS, KiB on Linux


def summarize(records: list[dict], seconds: float) -> dict:
    """Final numbers: the last step's metrics, and the mean reward of the first and last fifth of
    the steps with the standard error of their difference (step means as the samples)."""
    ok = [r for r in records if r.get("reward_mean") is not None]
    summary = {"steps": len(records), "seconds": seconds,
               "nonfinite_skipped": sum(1 for r in records if r.get("skipped"))}
    if records:
        summary["last"] = records[-1]
    if len(ok) >= 10:
        fifth = len(ok) // 5
        first = np.array([r["reward_mean"] for r in ok[:fifth]])
        last = np.array([r["reward_mean"] for r in ok[-fifth:]])
        stderr = math.sqrt(first.var(ddof=1) / fifth + last.var(ddof=1) / fifth)
        summary.update(reward_first_fifth=float(first.mean()), reward_last_fifth=float(last.mean()),
                       reward_gain=float(last.mean() - first.mean()), reward_gain_stderr=stderr)
    return summary


# ----------------------------------------------------------------------------------------------
# The loop


class _WatchedReward:
    """Passes the reward through and remembers whether its values were all finite."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn
        self.nonfinite = False

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        values = self.reward_fn(x0)
        self.nonfinite = bool(torch.is_tensor(values) and not torch.isfinite(values.detach()).all())
        return values


def _resolve_config(config, overrides: dict) -> Config:
    """`config` (a Config, a preset name or a YAML path; None: the demo preset, or when resuming
    the checkpoint's config) with `overrides` applied."""
    if isinstance(config, (str, Path)):
        config = Config.from_preset(str(config)) if str(config) in PRESETS else load_config(path=config)
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a Config, a preset name or a YAML path, got {type(config).__name__}")
    resume = overrides.get("resume", config.resume if config is not None else None)
    if config is None:
        if resume is not None:
            saved = read_checkpoint_meta(find_checkpoint(resume))["config"]
            config = Config().with_overrides(saved, validate=False)
        else:
            config = Config.from_preset("demo")
    return config.with_overrides(overrides)


def finetune(config: Config | str | None = None, *, callback: Optional[Callable[[int, dict], None]] = None,
             **overrides) -> Result:
    """Fine-tune a LoRA on the UNet to raise a reward; returns where the outputs are.

    `config`: a Config, a preset name or a YAML path; None runs the `demo` preset (or, with
    `resume=`, the resumed run's config). `overrides` set config keys (`finetune(lr=1e-3)`).
    `callback(step, metrics)` runs after every optimizer step. Ctrl-C writes a checkpoint and
    re-raises KeyboardInterrupt; `resume=out_dir` continues from it.
    """
    cfg = _resolve_config(config, overrides)
    device = resolve_device(cfg)
    dtype = DTYPES[cfg.dtype]
    checkpoint = None
    if cfg.resume is not None:
        checkpoint = find_checkpoint(cfg.resume)
        check_compatible(read_checkpoint_meta(checkpoint)["config"], cfg, checkpoint)
        cfg = cfg.with_overrides({"out_dir": str(checkpoint.parent.parent)})  # continue in the run's folder
    out = prepare_out_dir(cfg)
    prompts = load_prompts(cfg.prompts)
    reward = load_reward(cfg, device)
    if cfg.profile:  # ranges here and inside estimate; profiling may also be on from RLR_FAST_PROFILE=1
        enable_profiling(True)

    models = load_models(cfg.model, device, dtype)
    unet = models.unet
    if cfg.max_memory_gb is not None:
        cfg = plan_memory(cfg, out)
    latent_hw = latent_size(cfg.resolution, unet.config, models.vae.config)
    add_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
    params = lora_parameters(unet)
    for p in params:  # LoRA weights and AdamW state in fp32 whatever the frozen weights' dtype
        p.data = p.data.float()
    bank = PromptBank(models, prompts, cfg.negative_prompt)
    grid_prompts = list(range(min(cfg.sample_prompts, len(prompts))))
    if cfg.free_text_encoder:
        models.text_encoder = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    generators = {"sampling": torch.Generator().manual_seed(cfg.seed),
                  "estimator": torch.Generator().manual_seed(cfg.seed + 1)}
    start, counters = 0, {"consecutive_nonfinite": 0, "seconds": 0.0}
    if checkpoint is not None:
        meta, rng = load_checkpoint(checkpoint, unet, optimizer)
        start, counters = meta["step"], meta["counters"]
        restore_rng(rng, generators)
        print(f"resuming {out} at step {start} from {checkpoint}", file=sys.stderr)
    else:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    log = MetricsLog(out, keep_until=start if checkpoint is not None else None, tensorboard=cfg.tensorboard)
    grids: list[Path] = []

    def sample_grid(step: int) -> None:
        if not grid_prompts or not cfg.sample_seeds:
            return
        with nvtx_range("sample grid"):
            images = generate_images(models, bank.cond[grid_prompts], bank.negative, cfg.sample_seeds,
                                     num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                                     dtype=dtype, latent_hw=latent_hw)
        # generate_images is seed-major; show prompts as rows and seeds as columns
        images = images.reshape(len(cfg.sample_seeds), len(grid_prompts), *images.shape[1:]).transpose(0, 1)
        grids.append(save_grid(images.reshape(-1, *images.shape[2:]), len(grid_prompts),
                               out / "samples" / f"step_{step:06d}.png"))

    def write_checkpoint(step: int, rng: dict) -> Path:
        return save_checkpoint(out / "checkpoints" / f"step_{step:06d}.safetensors", step=step, cfg=cfg, unet=unet,
                               optimizer=optimizer, rng=rng, counters=counters)

    if checkpoint is None:
        sample_grid(0)
    rng_after_step = capture_rng(generators)  # the RNG state at the last step boundary
    step, last_checkpoint = start, checkpoint
    t_run = time.perf_counter()
    bar = _progress(cfg.train_steps, start)
    try:
        while step < cfg.train_steps:
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            record = _update(cfg, step, models, bank, reward, optimizer, params, generators, device, dtype)
            step += 1
            seconds = time.perf_counter() - t0
            counters["consecutive_nonfinite"] = counters["consecutive_nonfinite"] + 1 if record["skipped"] else 0
            counters["seconds"] += seconds
            record.update(seconds=seconds, peak_memory_bytes=peak_memory_bytes(device),
                          nonfinite_in_a_row=counters["consecutive_nonfinite"])
            log.write(record)
            rng_after_step = capture_rng(generators)
            bar.update(1)
            bar.set_postfix(reward=record["reward_mean"], skipped=sum(1 for r in log.records if r["skipped"]))
            if counters["consecutive_nonfinite"] >= cfg.max_nonfinite:
                raise NonFiniteError(
                    f"stopped at step {step}: {counters['consecutive_nonfinite']} updates in a row were skipped for "
                    f"a non-finite {record['skipped']} (max_nonfinite={cfg.max_nonfinite}); nothing was applied "
                    f"in those steps. Check the reward, or lower lr (now {cfg.lr}); metrics in {log.path}")
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.train_steps:
                sample_grid(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                last_checkpoint = write_checkpoint(step, rng_after_step)
            if callback is not None:
                callback(step, record)
    except KeyboardInterrupt:
        bar.close()
        path = write_checkpoint(step, rng_after_step)
        print(f"\ninterrupted after step {step}/{cfg.train_steps}; checkpoint written to {path}.\n"
              f"Resume with: rlr-fast finetune --resume {out}   (Python: rlr_fast.finetune(resume={str(out)!r}))",
              file=sys.stderr)
        raise
    finally:
        bar.close()
        log.close()

    if last_checkpoint is None or read_checkpoint_meta(last_checkpoint)["step"] != step:
        last_checkpoint = write_checkpoint(step, rng_after_step)
    sample_grid(step)
    lora_path = save_lora(unet, out)
    records = log.records
    curve = draw_reward_curve([r["step"] for r in records if r["reward_mean"] is not None],
                              [r["reward_mean"] for r in records if r["reward_mean"] is not None],
                              [r["reward_std"] for r in records if r["reward_mean"] is not None],
                              out / "reward_curve.png")
    summary = summarize(records, counters["seconds"])
    summary["wall_seconds_this_session"] = time.perf_counter() - t_run
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2), encoding="utf-8")
    print(f"done: {step} steps; outputs in {out} (LoRA {lora_path.name}, metrics.jsonl, reward_curve.png, samples/)",
          file=sys.stderr)
    return Result(out_dir=out, lora_path=lora_path, config_path=out / "config.yaml", metrics_path=log.path,
                  curve_path=curve, checkpoint_path=last_checkpoint, grid_paths=grids, metrics=_jsonable(summary))


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", dynamic_ncols=True)


def _update(cfg: Config, step: int, models: SDModels, bank: PromptBank, reward: Reward,
            optimizer: torch.optim.Optimizer, params: list, generators: dict, device: torch.device,
            dtype: torch.dtype) -> dict:
    """One optimizer step over `grad_accum` micro-batches; returns its metrics record.

    A NaN/Inf reward or gradient skips the whole update (gradients zeroed, nothing applied).
    """
    optimizer.zero_grad(set_to_none=True)
    rewards: list[float] = []
    stats: dict = {}
    skipped = None
    for _ in range(cfg.grad_accum):
        ids = draw_prompt_ids(len(bank.prompts), cfg.batch_size, cfg.images_per_prompt, generators["sampling"])
        x_T = initial_noise(models.unet, cfg.batch_size, generators["sampling"], device,
                            latent_size(cfg.resolution, models.unet.config, models.vae.config))
        with nvtx_range("rollout"), autocast(device, dtype):
            traj = rollout(models.unet, models.scheduler, x_T, num_steps=cfg.num_steps, eta=cfg.eta,
                           generator=generators["sampling"], split_cfg=cfg.split_cfg,
                           **bank.batch(ids, cfg.guidance_scale))
        reward_fn = _WatchedReward(latent_reward(models.vae, reward, [bank.prompts[i] for i in ids],
                                                 decode_chunk=cfg.decode_chunk, checkpoint_vae=cfg.checkpoint_vae))
        try:
            with nvtx_range("estimate"), autocast(device, dtype):
                micro = estimate(models.unet, traj, reward_fn, cfg.estimator_options(),
                                 generator=generators["estimator"], prompt_ids=ids)
        except ValueError:
            if not reward_fn.nonfinite:
                raise
            skipped = "reward"
            break
        rewards += micro["rewards"]
        for key in ("unet_forward", "unet_backward"):  # counts add up over micro-batches
            micro[key] += stats.get(key, 0)
        stats = micro
    grad_norm = None
    if skipped is None:
        for p in params:
            if p.grad is not None:
                p.grad /= cfg.grad_accum
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            skipped = "gradient"
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if skipped is None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        with nvtx_range("optimizer step"):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    values = np.array(rewards) if rewards else None
    estimator = {k: v for k, v in stats.items() if k not in ("rewards", "reward_mean", "reward_std")}
    return _jsonable({
        "step": step + 1,
        "reward_mean": None if values is None or skipped else float(values.mean()),
        "reward_std": None if values is None or skipped else float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "grad_norm": grad_norm, "lr": lr, "skipped": skipped or False, "estimator": estimator,
    })


# ----------------------------------------------------------------------------------------------
# Evaluation (the CLI's `sample` and `evaluate`)


def load_for_inference(model: str, lora: Optional[str], device: torch.device, dtype: torch.dtype) -> SDModels:
    """A model for sampling, with a LoRA written by `finetune` (or `save_lora`) when given."""
    models = load_models(model, device, dtype)
    if lora is not None:
        load_lora(models.unet, lora)
    return models


def evaluate_reward(models: SDModels, reward: Reward, prompts: list[str], seeds, *, num_steps: int, eta: float,
                    guidance_scale: float, negative_prompt: str = "", dtype: torch.dtype = torch.float32,
                    batch_size: int = 16) -> dict:
    """Reward statistics over every (prompt, seed): mean, std, standard error, and per-prompt means."""
    negative = models.encode_prompts([negative_prompt])
    values = []  # (seed, prompt) order
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = models.encode_prompts(chunk)
        for seed in seeds:
            images = generate_images(models, cond, negative, [seed], num_steps=num_steps, eta=eta,
                                     guidance_scale=guidance_scale, dtype=dtype)
            with torch.no_grad():
                r = reward(images.to(models.unet.device), chunk).float().cpu()
            values += [(seed, p, float(v)) for p, v in zip(chunk, r)]
    scores = np.array([v for _, _, v in values])
    per_prompt = {p: float(np.mean([v for _, q, v in values if q == p])) for p in prompts}
    n = len(scores)
    std = float(scores.std(ddof=1)) if n > 1 else 0.0
    return {"n": n, "mean": float(scores.mean()), "std": std, "stderr": std / math.sqrt(n),
            "nonfinite": int((~np.isfinite(scores)).sum()), "per_prompt": per_prompt,
            "seeds": [int(s) for s in seeds], "num_steps": num_steps, "eta": eta, "guidance_scale": guidance_scale}
