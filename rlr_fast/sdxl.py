"""Stable Diffusion XL: local diffusers folders, a tiny offline builder, and its prompt conditioning.

SDXL's UNet is a UNet2DConditionModel with text_time added conditions; the SDXL family's adapter
(rlr_fast.families.SDXL) calls it, so rollout, recomputation, CUDA graphs, SQDF and every estimator
run on it unchanged. This module makes its conditioning as `StableDiffusionXLPipeline` does:

* both text encoders' penultimate hidden states, concatenated: (B, 77, 768 + 1280) for SDXL 1.0;
* the pooled embedding of the second (CLIPTextModelWithProjection's text_embeds): (B, 1280);
* time_ids = original size + crop top-left + target size, (H, W, 0, 0, H, W) for H x W images
  (the pipeline's default; `set_resolution` sets the size), in the embeddings' dtype as the
  pipeline builds them;
* the empty prompt, our default negative prompt, as zero embeddings when the folder's pipeline says
  force_zeros_for_empty_prompt (SDXL 1.0's does): what the pipeline's unconditional pass uses when
  no negative prompt is given. Guidance then runs both passes with their own packed conditioning.

All three are packed into one (B, 77 + rows, D) tensor (`families.SDXL.pack`).

The VAE: SDXL 1.0's VAE overflows in fp16 (its decoder's activations pass fp16's range: black or NaN
images), and its config says `force_upcast: true`. We then load it in float32 whatever dtype the UNet
and text encoders take, as the pipeline upcasts it before decoding; a folder holding the fp16-fix VAE
(madebyollin/sdxl-vae-fp16-fix, `force_upcast: false`) keeps it in the run's dtype. Decoding
(rewards/latent.py, inference.py) runs in the VAE's own dtype, so nothing else changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .components import (COMPONENTS, SDModels, check_dtype, check_sd_folder, component_loaders, latent_size,
                         load_components, safetensors_kwargs, tiny_tokenizer)
from .families import SDXL
from .lora import has_lora

SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")


@dataclass
class SDXLModels(SDModels):
    """SDXL's components: SDModels' and the second text encoder and tokenizer. `image_size` (height,
    width) in pixels is what prompts are encoded for (None: the model's native size)."""

    text_encoder_2: Optional[CLIPTextModelWithProjection] = None
    tokenizer_2: Optional[CLIPTokenizer] = None
    force_zeros_for_empty_prompt: bool = True
    image_size: Optional[tuple[int, int]] = None

    def set_resolution(self, resolution) -> tuple[int, int]:
        latent_hw = super().set_resolution(resolution)
        scale = vae_scale(self.vae.config)
        self.image_size = (latent_hw[0] * scale, latent_hw[1] * scale)
        return latent_hw

    def free_text_encoders(self) -> None:
        self.text_encoder = self.text_encoder_2 = None

    def time_ids(self) -> list[int]:
        """(original h, w, crop top, left, target h, w) for `image_size`, as StableDiffusionXLPipeline
        makes them when called without size arguments."""
        size = self.image_size
        if size is None:
            size = tuple(s * vae_scale(self.vae.config) for s in latent_size(None, self.unet.config, self.vae.config))
        return [*size, 0, 0, *size]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The packed conditioning (B, 77 + rows, D) of `prompts` (module docstring)."""
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        if any(part is None for pair in pairs for part in pair) or self.unet is None:
            raise ValueError("SDXL's encode_prompts needs the unet, both tokenizers and both text encoders; load "
                             "them with load_sdxl (free_text_encoders only after encoding)")
        hidden = []
        for tokenizer, encoder in pairs:
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        tokens, pooled = torch.cat(hidden, -1), out.text_embeds.to(hidden[0].dtype)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=tokens.device)
            tokens, pooled = tokens.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
        time_ids = torch.tensor([self.time_ids()], dtype=tokens.dtype, device=tokens.device).expand(len(prompts), -1)
        return SDXL.pack(tokens, pooled, time_ids)

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write the folder `StableDiffusionXLPipeline.from_pretrained` and `load_sdxl` read (safetensors).
        The UNet must not carry a LoRA adapter (save that with `lora.save_lora`)."""
        missing = [name for name in SDXL_COMPONENTS if getattr(self, name) is None]
        if missing:
            raise ValueError(f"save_pretrained needs all of {SDXL_COMPONENTS}; missing: {missing}")
        if has_lora(self.unet):
            raise ValueError("the UNet has a LoRA adapter; save the base pipeline before add_lora and the "
                             "adapter with save_lora")
        pipe = StableDiffusionXLPipeline(**{name: getattr(self, name) for name in SDXL_COMPONENTS},
                                         force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                                         add_watermarker=False)
        pipe.save_pretrained(directory, safe_serialization=True)
        return Path(directory)


def vae_scale(vae_config) -> int:
    """How many pixels one latent pixel is across: 2 per VAE level after the first (8 for SDXL)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def vae_dtype(path: Path, dtype: torch.dtype) -> torch.dtype:
    """float32 for a VAE whose config says force_upcast (SDXL 1.0's: fp16 overflows), else `dtype`."""
    return SDXL.vae_dtype(json.loads((path / "vae" / "config.json").read_text(encoding="utf-8")), dtype)


def sdxl_config(vae_fp16_fix: bool = False) -> dict[str, dict]:
    """Constructor configs of SDXL 1.0 base's UNet, VAE and two text encoders (CLIP ViT-L/14 text and
    OpenCLIP ViT-bigG/14 text with its projection), written out from stabilityai/stable-diffusion-xl-
    base-1.0's config files so that the memory planner builds the shapes without the download. The
    VAE is SDXL's own (force_upcast: loaded in float32), or with `vae_fp16_fix` madebyollin/sdxl-vae-
    fp16-fix (the same architecture, force_upcast false: kept in the run's dtype). A fresh dict each call."""
    clip = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                pad_token_id=1)
    return {
        "unet": dict(
            _class_name="UNet2DConditionModel", sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
        ),
        "vae": dict(
            sample_size=1024, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", scaling_factor=0.13025,
            force_upcast=not vae_fp16_fix,
        ),
        "text_encoder": dict(clip, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
        "text_encoder_2": dict(clip, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
    }


def load_sdxl(path: Union[str, Path], dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
              components: Optional[tuple[str, ...]] = None) -> SDXLModels:
    """Load SDXL from a LOCAL diffusers folder (what `StableDiffusionXLPipeline.save_pretrained` writes),
    frozen and in eval mode; the scheduler as a DDIMScheduler (SDXL 1.0 ships an EulerDiscreteScheduler
    config: its betas, steps_offset, spacing, and clip_sample / set_alpha_to_one false, carry over as
    `models.load_ddim_scheduler` says) and the VAE in float32 unless it is the fp16-fix VAE (module
    docstring). `components` None loads all of them."""
    check_dtype(dtype)
    path = Path(path)
    components = SDXL_COMPONENTS if components is None else components
    check_sd_folder(path, components, allowed=SDXL_COMPONENTS)
    loaders = component_loaders(path, dtype)
    loaders.update(
        vae=lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype(path, dtype),
                                                  local_files_only=True, **safetensors_kwargs(path, "vae")),
        text_encoder_2=lambda: CLIPTextModelWithProjection.from_pretrained(
            path / "text_encoder_2", dtype=dtype, local_files_only=True, **safetensors_kwargs(path, "text_encoder_2")),
        tokenizer_2=lambda: CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True),
    )
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    return SDXLModels(**load_components(path, loaders, components, device), path=path,
                      force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))


def tiny_sdxl(seed: int = 0, *, sample_size: int = 8) -> SDXLModels:
    """A randomly initialised SDXL at toy width, built offline: SDXL's component types and wiring (two
    CLIP text encoders whose hidden states are concatenated, the pooled projection and time ids as
    text_time added conditions, a VAE with SDXL's scaling factor and force_upcast, the DDIM schedule of
    SDXL's scheduler config). Images are 2 * sample_size pixels. Weights depend only on `seed`."""
    tokenizer = tiny_tokenizer()
    width, pooled, time_dim = 16, 24, 8  # per text encoder; pooled projection; per time id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * width, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
            layers_per_block=1, norm_num_groups=8, sample_size=2 * sample_size, scaling_factor=0.13025,
            force_upcast=True,
        )
        text = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                    max_position_embeddings=77, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=pooled))
    scheduler = DDIMScheduler(  # what load_sdxl makes of SDXL 1.0's scheduler config (an Euler one)
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return SDXLModels(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                      text_encoder_2=text_encoder_2, tokenizer_2=tokenizer)
