"""Models for sampling and the pictures made from them: device and precision, loading (with a
LoRA), seeded sampling, decoding and image grids. The training loop samples its grids with these,
and the CLI's `sample` and `evaluate` (rlr_fast.evaluation) are built on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from .config import Config
from .families import family_of
from .models import FLOW_PIPELINES, SDModels, check_sd_folder, load_sd, pipeline_class
from .checkpoint import read_checkpoint, restore_lora
from .lora import add_lora, load_lora
from .rollout import Trajectory, rollout
from .run_dir import atomic_write
from .video import check_num_frames, is_video_model, is_video_unet, load_video

FLOW_PARTS = ("transformer", "vae", "scheduler")  # what an SD3 or FLUX folder has in place of unet/
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
HALF_DTYPES = ("float16", "bfloat16")


def resolve_device(cfg: Config) -> tuple[torch.device, Config]:
    """The torch device of a config, and the config with a precision that device runs: half
    precision is autocast on a GPU, so on the CPU a float16/bfloat16 config runs in float32 (said
    once on stderr). A device that cannot be had, or float64 on a GPU, is a ValueError saying why."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={cfg.device!r} (preset {cfg.preset!r}) needs a CUDA GPU, but none is available "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a machine with a "
                "GPU, or choose the CPU (finetune: --preset demo or --set device=cpu; sample/evaluate: --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={cfg.device!r}: only {torch.cuda.device_count()} GPU(s) are visible")
        if cfg.dtype == "float64":
            raise ValueError(f"dtype='float64' runs on the CPU only (exact reproducibility checks), but device="
                             f"{cfg.device!r} is a GPU; set device=cpu, or choose float32, float16 or bfloat16")
    else:
        cfg = cpu_precision(cfg)
    return device, cfg


def cpu_precision(cfg: Config) -> Config:
    """`cfg` with float32 for what it asks in half precision, said once on stderr: on the CPU half
    precision is emulated (a float16 reward network's backward far slower than in float32), so
    the weights' dtype and the rewards' (reward_kwargs, eval_reward_kwargs) both run in float32."""
    def is_half(dtype) -> bool:
        return str(dtype).removeprefix("torch.") in HALF_DTYPES

    changes, said = {}, []
    if is_half(cfg.dtype):
        changes["dtype"], said = "float32", [f"dtype={cfg.dtype} (autocast)"]
    if is_half(cfg.reward_kwargs.get("dtype")):
        changes["reward_kwargs"] = {**cfg.reward_kwargs, "dtype": "float32"}
        said.append(f"the reward network's dtype={cfg.reward_kwargs['dtype']}")
    evals = {name: {**kw, "dtype": "float32"} if is_half(kw.get("dtype")) else kw
             for name, kw in cfg.eval_reward_kwargs.items()}
    if evals != cfg.eval_reward_kwargs:
        changes["eval_reward_kwargs"] = evals
        said.append("eval_reward_kwargs' half-precision dtypes")
    if said:
        print(f"note: {' and '.join(said)} {'is' if len(said) == 1 else 'are'} for GPUs; running in float32 on the "
              "CPU", file=sys.stderr)
    return dataclasses.replace(cfg, **changes)


def check_model(model: str, motion_adapter: Optional[str] = None) -> None:
    """Refuse a model that cannot load, before anything slow runs (the full check is `load_models`)."""
    if model != "default" and pipeline_class(Path(model)) in FLOW_PIPELINES:
        check_sd_folder(Path(model), FLOW_PARTS, allowed=FLOW_PARTS)
    elif model != "default":
        check_sd_folder(Path(model))
    if motion_adapter is not None and not Path(motion_adapter).is_dir():
        raise FileNotFoundError(f"motion adapter folder {motion_adapter} does not exist")


def load_models(model: str, device: torch.device, dtype: torch.dtype, motion_adapter: Optional[str] = None) -> SDModels:
    """The embedded default model, a local diffusers Stable Diffusion folder, or a video model
    (`rlr_fast.video.load_video`: a text-to-video folder, or SD plus a motion adapter)."""
    if is_video_model(model, motion_adapter):
        return load_video(model, dtype=dtype, device=device, motion_adapter=motion_adapter)
    if model == "default":
        from .default_model import load_default

        return load_default(dtype=dtype, device=device)
    return load_sd(model, dtype=dtype, device=device)


def load_for_inference(model: str, lora: Optional[str], device: torch.device, dtype: torch.dtype,
                       motion_adapter: Optional[str] = None) -> SDModels:
    """A model for sampling, with a LoRA when given: a folder of `finetune`'s final LoRA (or
    `save_lora`'s), or a checkpoint file of a run (its LoRA at that step). Either is verified."""
    models = load_models(model, device, dtype, motion_adapter)
    if lora is not None and Path(lora).is_file():
        checkpoint = read_checkpoint(lora)
        add_lora(models.unet, rank=checkpoint.config["lora_rank"], alpha=checkpoint.config["lora_alpha"])
        restore_lora(checkpoint, models.unet)
    elif lora is not None:
        load_lora(models.unet, lora)
    return models


def initial_noise(unet, batch: int, generator: torch.Generator, device: torch.device,
                  latent_hw: Optional[tuple[int, int]] = None, num_frames: Optional[int] = None) -> torch.Tensor:
    """x_T (batch, *latent_shape(...)) in the UNet's `chain_dtype`, drawn in float32 on the CPU from
    `generator` (the same on every device and in every dtype)."""
    x_T = torch.randn((batch, *latent_shape(unet, latent_hw, num_frames)), generator=generator, dtype=torch.float32)
    return x_T.to(device, chain_dtype(unet))


def chain_dtype(unet) -> torch.dtype:
    """The sampling chain's dtype: float32 (half-precision weights run under autocast, the latents stay
    float32), or float64 for a float64 UNet (dtype='float64': everything in float64)."""
    return torch.promote_types(next(unet.parameters()).dtype, torch.float32)


def latent_shape(unet, latent_hw: Optional[tuple[int, int]] = None, num_frames: Optional[int] = None) -> tuple:
    """One sample's latent shape: (C, h, w), or (C, num_frames, h, w) for a video UNet; latent_hw None:
    the UNet's native size."""
    h, w = latent_hw or (unet.config.sample_size,) * 2
    frames = ()
    if is_video_unet(unet):
        check_num_frames(unet, num_frames)
        frames = (num_frames,)
    return (family_of(unet).latent_channels(unet), *frames, h, w)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on a GPU when the weights are half precision; nothing otherwise."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, frame_chunk: int = 8) -> torch.Tensor:
    """Images in [0, 1], float32 (B, 3, H, W), of latents in the diffusion model's scale; videos
    (B, F, 3, H, W) of video latents (B, C, F, h, w), decoded `frame_chunk` frames at a time."""
    if latents.dim() == 5:
        b, c, f, h, w = latents.shape
        frames = latents.transpose(1, 2).reshape(b * f, c, h, w)
        images = torch.cat([decode_latents(vae, chunk) for chunk in frames.split(frame_chunk)])
        return images.reshape((b, f) + tuple(images.shape[1:]))
    # SD3's and FLUX's VAEs also shift their latents (shift_factor); SD1.x's and SDXL's have none
    z = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0)
    return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


def progress(total: int, desc: str, unit: str, *, initial: int = 0, leave: bool = False, enabled: bool = True):
    """A tqdm bar on stderr for a long phase (one that shows nothing unless `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                disable=not enabled)


@torch.no_grad()
def sample_chain(models: SDModels, cond: torch.Tensor, negative: Optional[torch.Tensor], seed: int, *, num_steps: int,
                 eta: float, guidance_scale: float, dtype: torch.dtype = torch.float32,
                 latent_hw: Optional[tuple[int, int]] = None, prompt_index: Optional[torch.Tensor] = None,
                 num_frames: Optional[int] = None) -> Trajectory:
    """The sampling chain of P prompt embeddings `cond` (P, L, D) for one seed: x_T and every step's
    noise are drawn from a generator seeded with `seed`, so a fixed (prompt list, seed) always gives
    the same chain of a given model, and two models given the same seed start from the same x_T and
    draw the same noises. Under a prompt schedule (`PromptBank.conditioning`), `cond` holds the
    distinct embeddings and `prompt_index` (num_steps, P) which one each of the P samples uses at each
    step; `num_frames` is a video model's."""
    device = models.unet.device
    batch = len(cond) if prompt_index is None else prompt_index.shape[1]
    generator = torch.Generator().manual_seed(int(seed))
    x_T = initial_noise(models.unet, batch, generator, device, latent_hw, num_frames)
    with autocast(device, dtype):
        return rollout(models.unet, models.scheduler, x_T, num_steps=num_steps, eta=eta, encoder_hidden_states=cond,
                       prompt_index=prompt_index, guidance_scale=guidance_scale,
                       negative_encoder_hidden_states=None if guidance_scale == 1.0 else negative.expand(batch, -1, -1),
                       generator=generator)


@torch.no_grad()
def generate_images(models: SDModels, cond: torch.Tensor, negative: Optional[torch.Tensor], seeds, *,
                    num_steps: int, eta: float, guidance_scale: float, dtype: torch.dtype = torch.float32,
                    desc: Optional[str] = None, latent_hw: Optional[tuple[int, int]] = None,
                    prompt_index: Optional[torch.Tensor] = None, num_frames: Optional[int] = None) -> torch.Tensor:
    """Images (len(seeds) * P, 3, H, W) in [0, 1] for P prompt embeddings `cond` (P, L, D), seed-major;
    videos (len(seeds) * P, num_frames, 3, H, W) from a video model. Each seed's come from
    `sample_chain` (see it for `prompt_index`). With `desc`, a progress bar counts the seeds."""
    images = []
    bar = progress(len(seeds), desc, "seed") if desc else contextlib.nullcontext()
    with bar:
        for seed in seeds:
            traj = sample_chain(models, cond, negative, seed, num_steps=num_steps, eta=eta,
                                guidance_scale=guidance_scale, dtype=dtype, latent_hw=latent_hw,
                                prompt_index=prompt_index, num_frames=num_frames)
            images.append(decode_latents(models.vae, traj.x0).cpu())
            if desc:
                bar.update(1)
    return torch.cat(images)


def save_grid(images: torch.Tensor, rows: int, path: Path, min_cell: int = 128, pad: int = 2,
              fps: int = 8) -> Path:
    """Images (rows * cols, 3, H, W) in [0, 1], row-major, as one PNG with `pad` white pixels between
    them; small images are enlarged (nearest neighbour) to at least `min_cell` pixels so a 32 px
    sample stays visible. One image with min_cell=0, pad=0 is saved as it is. Videos
    (rows * cols, F, 3, H, W) are saved as an animated GIF of such grids, `fps` frames a second."""
    if images.dim() == 5:
        frames = [grid_image(images[:, f], rows, min_cell, pad) for f in range(images.shape[1])]
        return atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, loop=0,
                                                             append_images=frames[1:], duration=1000 // fps))
    canvas = grid_image(images, rows, min_cell, pad)
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def grid_image(images: torch.Tensor, rows: int, min_cell: int = 128, pad: int = 2) -> Image.Image:
    """Images (rows * cols, 3, H, W) tiled as `save_grid` saves them."""
    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    canvas = Image.new("RGB", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), "white")
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        tile = Image.fromarray(pixels[i]).resize((w * scale, h * scale), Image.NEAREST)
        r, c = divmod(i, cols)
        canvas.paste(tile, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    return canvas


def prompt_rows(images: torch.Tensor, seeds: int) -> torch.Tensor:
    """`generate_images`' seed-major images reordered prompt-major: prompts as rows, seeds as columns."""
    grid = images.reshape(seeds, -1, *images.shape[1:]).transpose(0, 1)
    return grid.reshape(-1, *images.shape[1:])
