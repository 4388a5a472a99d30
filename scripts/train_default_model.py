"""Train the embedded default model (rlr_fast/assets/default_model) from procedural images.

A tiny text-to-image latent diffusion model with Stable Diffusion 1.4's component types
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer, DDIMScheduler with SD1.4's
schedule) that draws 32x32 "a red circle on a blue background" images from `rlr_fast.demo_data`.
Three stages:

1. the VAE as an autoencoder (MSE + a small KL term) on demo images, 32x32 -> 8x8x4 latents;
2. freeze it, encode the data set once, set `vae.config.scaling_factor` so latents have unit std;
3. the text encoder and the UNet jointly with the epsilon-prediction diffusion loss, captions
   dropped to "" 10% of the time so classifier-free guidance works.

Retrain (deterministic given --seed; one CPU thread, so it leaves the other core free):

    python scripts/train_default_model.py --out rlr_fast/assets/default_model \
        --grid docs/default_model_samples.png

Redraw only the sample grid from the saved model:

    python scripts/train_default_model.py --out rlr_fast/assets/default_model --skip-training \
        --grid docs/default_model_samples.png

Measured here: 24.2 min on one thread of a shared 2-core CPU (VAE 3.7 min, encoding 0.9 min,
diffusion 19.5 min; VAE MSE 0.0147, latent scaling factor 0.649, final diffusion loss 0.122;
colour accuracy over 64 samples, chance 1/8: shape colour 0.92, background 1.00). Parameters:
UNet 1.78M, VAE 0.68M, text encoder 0.14M (10.5 MB of fp32 safetensors). Colours follow the
prompt; shapes come out as rounded blobs, rarely clean squares or triangles.

The VAE's GroupNorm uses 2 groups on purpose: with one channel per group (16 groups on 16
channels) it normalises every channel of a flat-colour image to zero mean, erasing the colour,
and the autoencoder stalls (MSE 0.39 vs 0.07 after 200 steps in a side-by-side run here).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from rlr_fast import demo_data
from rlr_fast.default_model import sample
from rlr_fast.models import SDModels, load_sd, tiny_sd

IMAGE_SIZE = 32
LATENT_SIZE = 8  # three VAE blocks: two 2x downsamples
TEXT_DIM = 64  # text encoder width = the UNet's cross_attention_dim
CAPTION_DROPOUT = 0.1


def build_models(seed: int) -> SDModels:
    """Freshly initialised components (weights depend only on `seed`)."""
    # the byte-level CLIP tokenizer of rlr_fast.models: any prompt tokenizes, offline
    tokenizer = tiny_sd().tokenizer
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=2,
        block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_DIM, num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * TEXT_DIM,
        max_position_embeddings=tokenizer.model_max_length, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    # SD1.4's noise schedule and DDIM settings
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )
    return SDModels(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as Stable Diffusion's VAE sees images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(optimizer, peak: float, step: int, total: int, warmup: int) -> None:
    """Linear warmup to `peak`, then cosine decay to 0: a short run ends on settled weights."""
    if step < warmup:
        lr = peak * (step + 1) / warmup
    else:
        lr = peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, steps: int, batch: int, kl_weight: float,
              generator: torch.Generator) -> float:
    """Autoencoder training; returns the reconstruction MSE of the last 50 steps (in [-1, 1] units)."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    recent = []
    progress = tqdm(range(steps), desc="vae")
    for step in progress:
        cosine_lr(optimizer, 1e-3, step, steps, warmup=50)
        x = pixels[torch.randint(len(pixels), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        mse = F.mse_loss(vae.decode(z).sample, x)
        # KL per latent element: keeps the posterior's noise, so the decoder tolerates imperfect latents
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [mse.item()])[-50:]
        progress.set_postfix(mse=f"{np.mean(recent):.5f}", kl=f"{kl.item():.3f}")
    vae.eval().requires_grad_(False)
    return float(np.mean(recent))


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image's latent (unscaled)."""
    means, stds = [], []
    for start in tqdm(range(0, len(pixels), batch), desc="encode"):
        posterior = vae.encode(pixels[start:start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_diffusion(models: SDModels, latent_mean: torch.Tensor, latent_std: torch.Tensor, captions: list[str],
                    steps: int, batch: int, lr: float, generator: torch.Generator) -> float:
    """Text encoder + UNet with the epsilon-prediction loss; returns the loss of the last 100 steps.

    `latent_mean` / `latent_std` are the VAE posterior of each image, already scaled by
    `scaling_factor`; every step draws a fresh latent from it, as Stable Diffusion trains.
    """
    unet, text_encoder, scheduler = models.unet, models.text_encoder, models.scheduler
    ids = tokenize(models.tokenizer, captions)
    empty_ids = tokenize(models.tokenizer, [""])
    params = [*unet.parameters(), *text_encoder.parameters()]
    for module in (unet, text_encoder):
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    recent = []
    progress = tqdm(range(steps), desc="diffusion")
    for step in progress:
        cosine_lr(optimizer, lr, step, steps, warmup=100)
        index = torch.randint(len(ids), (batch,), generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
        dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        batch_ids = torch.where(dropped[:, None], empty_ids, ids[index])
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(batch_ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-100:]
        progress.set_postfix(loss=f"{np.mean(recent):.4f}")
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return float(np.mean(recent))


def color_accuracy(models: SDModels, prompts: list[str], seeds: range, **sample_kw) -> dict[str, float]:
    """Fraction of samples whose measured shape / background colour is the prompt's."""
    hits = {"color": 0, "background": 0}
    for seed in seeds:
        for image, prompt in zip(sample(models, prompts, seed=seed, **sample_kw), prompts):
            measured, wanted = demo_data.measure_colors(image), demo_data.parse_prompt(prompt)
            for part in hits:
                hits[part] += measured[part] == wanted[part]
    total = len(prompts) * len(seeds)
    return {part: count / total for part, count in hits.items()}


def save_grid(models: SDModels, prompts: list[str], seeds: range, path: Path, scale: int = 3) -> None:
    """A PNG with one row per prompt (its caption on the left) and one column per seed."""
    rows = np.stack([sample(models, prompts, seed=seed) for seed in seeds], axis=1)  # (prompts, seeds, H, W, 3)
    cell = IMAGE_SIZE * scale + 4
    label_width = 230
    grid = Image.new("RGB", (label_width + cell * len(seeds), cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for i, prompt in enumerate(prompts):
        draw.text((4, i * cell + cell // 2 - 6), prompt, fill="black")
        for j, image in enumerate(rows[i]):
            tile = Image.fromarray(image).resize((IMAGE_SIZE * scale,) * 2, Image.NEAREST)
            grid.paste(tile, (label_width + j * cell + 2, i * cell + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("rlr_fast/assets/default_model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=20000, help="size of the procedural training set")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=1000, help="diffusion training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-training", action="store_true", help="load the model at --out instead")
    parser.add_argument("--grid", type=Path, help="also write a sample grid PNG (PROMPTS x 6 seeds) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.skip_training:
        models = load_sd(args.out)
    else:
        start = time.time()
        models = build_models(args.seed)
        images, captions = demo_data.make_dataset(args.images, IMAGE_SIZE, seed=args.seed)
        pixels = to_pixels(images)
        generator = torch.Generator().manual_seed(args.seed)
        vae_mse = train_vae(models.vae, pixels, args.vae_steps, args.vae_batch, args.kl_weight, generator)
        latent_mean, latent_std = encode_dataset(models.vae, pixels)
        spread = (latent_mean + latent_std * torch.randn(latent_mean.shape, generator=generator)).std().item()
        models.vae.register_to_config(scaling_factor=1.0 / spread)
        scale = models.vae.config.scaling_factor
        loss = train_diffusion(models, latent_mean * scale, latent_std * scale, captions, args.steps, args.batch,
                               args.lr, generator)
        minutes = (time.time() - start) / 60
        models.save_pretrained(args.out)
        print(f"trained in {minutes:.1f} min: vae mse {vae_mse:.5f}, scaling_factor {scale:.4f}, "
              f"diffusion loss {loss:.4f}; saved to {args.out}")
        models = load_sd(args.out)  # evaluate exactly what was shipped

    accuracy = color_accuracy(models, demo_data.PROMPTS, range(4))
    print(f"colour accuracy over {len(demo_data.PROMPTS) * 4} samples (chance 1/{len(demo_data.COLORS)}): "
          f"shape {accuracy['color']:.3f}, background {accuracy['background']:.3f}")
    if args.grid:
        save_grid(models, demo_data.PROMPTS, range(6), args.grid)
        print(f"sample grid written to {args.grid}")


if __name__ == "__main__":
    main()
