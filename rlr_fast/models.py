"""Stable Diffusion components for reward fine-tuning, loaded and saved in the formats diffusers reads.

Three jobs, each kept to stock diffusers / transformers calls so that what we write is what
the ecosystem reads back:

* `load_sd`: load a LOCAL diffusers Stable Diffusion folder (never the network) with errors that
  say which path or component is wrong (an SDXL folder goes to rlr_fast.sdxl, which builds on the
  loaders here; an SD3 or FLUX folder to rlr_fast.flow).
* `tiny_sd`: a randomly initialised pipeline with the SD1.4 component types at toy width, built
  offline (tokenizer included), so tests and CI run on a CPU in seconds.
* `sd14_config` / `build_sd14_on_meta`: the real SD1.4 architectures on the meta device, for memory
  and FLOP estimates without weights.

LoRA adapters on the UNet are rlr_fast.lora's.

The pieces every family's loader shares (SDModels, folder checks, the DDIM scheduler, latent sizes)
are rlr_fast.components'; they are importable from here too.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from .components import (COMPONENTS, FLOW_PIPELINES, SDModels, check_components, check_dtype, check_sd_folder,
                         component_loaders, latent_size, load_components, load_ddim_scheduler, pipeline_class,
                         tiny_tokenizer, write_byte_tokenizer)
from .flow import load_flow
from .sdxl import load_sdxl

__all__ = [
    "SDModels", "load_sd", "tiny_sd", "sd14_config", "build_sd14_on_meta", "latent_size", "check_dtype",
    "check_sd_folder", "pipeline_class", "load_ddim_scheduler", "tiny_tokenizer", "write_byte_tokenizer",
    "COMPONENTS", "FLOW_PIPELINES",
]


def load_sd(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            components: tuple[str, ...] | None = None) -> SDModels:
    """Load Stable Diffusion components from a local diffusers folder, frozen and in eval mode.

    The folder is what `StableDiffusionPipeline.save_pretrained` writes (model_index.json plus
    unet/, vae/, text_encoder/, tokenizer/, scheduler/); `components` None loads all of them. A folder
    of a `StableDiffusionXLPipeline` loads with `rlr_fast.sdxl.load_sdxl` (its components, its
    `SDXLModels`). Every load passes `local_files_only=True`, so a wrong path fails here instead of
    turning into a hub download.

    The scheduler is always loaded as a `DDIMScheduler` from scheduler/scheduler_config.json: the RLR
    estimator needs DDIM's Gaussian transition, and SD1.4 ships a PNDMScheduler config that
    `DDIMScheduler.from_pretrained` converts (same betas; PNDM-only keys are ignored; see
    `load_ddim_scheduler` for clip_sample). Weights load from safetensors wherever a component has them.
    """
    check_dtype(dtype)
    path = Path(path)
    if pipeline_class(path) == "StableDiffusionXLPipeline":
        return load_sdxl(path, dtype, device, components)
    if pipeline_class(path) in FLOW_PIPELINES:
        if components is not None:
            raise ValueError(f"{path} is a {pipeline_class(path)} folder: load_sd loads all of its components "
                             "(rlr_fast.flow.load_flow(..., t5=False) leaves SD3's T5 out)")
        return load_flow(path, dtype, device)
    components = COMPONENTS if components is None else components
    check_sd_folder(path, components)
    return SDModels(**load_components(path, component_loaders(path, dtype), components, device), path=path)


def tiny_sd(seed: int = 0, *, sample_size: int = 8, cross_attention_dim: int = 32) -> SDModels:
    """A randomly initialised Stable Diffusion with SD1.4's component types at toy width.

    Same classes, block types, tokenizer conventions (77 tokens) and DDIM schedule as SD1.4, so code
    paths match the real model, but everything builds offline in well under a second. The VAE
    downsamples 2x, so images are 2 * sample_size pixels. Weights depend only on `seed`: they are
    drawn inside `torch.random.fork_rng`, leaving the caller's global RNG state untouched.
    """
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
            layers_per_block=1, norm_num_groups=8, sample_size=2 * sample_size,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=cross_attention_dim, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=77, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return SDModels(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def sd14_config() -> dict[str, dict]:
    """Constructor kwargs of the Stable Diffusion 1.4 UNet, VAE and text encoder (CLIP ViT-L/14 text).

    Written out from CompVis/stable-diffusion-v1-4's config files so that shapes can be built without
    the download. A fresh dict each call, safe to edit.
    """
    return {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
            center_input_sample=False,
        ),
        "vae": dict(
            sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu",
        ),
        "text_encoder": dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ),
    }


def build_sd14_on_meta(components: tuple[str, ...] = ("unet",)) -> dict[str, nn.Module]:
    """SD1.4 modules on the meta device: real shapes and parameter counts, no memory, no weights.

    For memory and FLOP estimates (e.g. `sum(p.numel() for p in m.parameters())`); the modules
    cannot run forward on real data.
    """
    builders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
                "text_encoder": lambda **kw: CLIPTextModel(CLIPTextConfig(**kw))}
    check_components(components, tuple(builders))
    config = sd14_config()
    with torch.device("meta"):
        return {name: builders[name](**config[name]).eval().requires_grad_(False) for name in components}
