"""Flow-matching transformers: SD3 / SD3.5 and FLUX from local diffusers folders, tiny offline builders,
and their prompt conditioning.

Both are velocity-prediction transformers sampled with the flow SDE (rlr_fast.samplers.FlowSampler,
docs/estimator.md §14); their families' adapters (rlr_fast.families.SD3, .FLUX) call them, so rollout,
recomputation, CUDA graphs, SQDF and every estimator run on them unchanged. `FlowModels` keeps the
transformer in the `unet` field every other module reads the denoising network from.

Conditioning is made by the family's own pipeline (`encode_prompt` of a pipeline over these
components, so it is what the pipeline conditions on) and packed into one tensor per prompt:

* SD3: tokens (CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's
  `max_sequence_length` tokens; zeros where T5 was not loaded, as the pipeline does) and the pooled
  projections (both CLIPs' text_embeds) after them;
* FLUX: T5's tokens, the CLIP pooled embedding and the distilled guidance value (`guidance`,
  FluxPipeline's guidance_scale, 3.5 by default) after them. rlr_fast's guidance_scale stays
  classifier-free guidance (FluxPipeline's true_cfg_scale).

T5 is optional for SD3 (`load_flow(..., t5=False)`: the pipeline's zero tokens in its place) and, as
every text encoder, freed after encoding (`free_text_encoders`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .components import FLOW_PIPELINES, SDModels, check_dtype, pipeline_class, tiny_tokenizer
from .families import pack_vectors
from .lora import has_lora
from .samplers import FlowSampler
from .sdxl import vae_scale

TEXT = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
FLUX_NATIVE_LATENT = 128  # FluxPipeline's default_sample_size: 1024 px images


@dataclass
class FlowModels(SDModels):
    """An SD3 or FLUX pipeline's components: `unet` holds the transformer, `scheduler` the FlowSampler
    over the folder's FlowMatchEulerDiscreteScheduler. `pipeline_name` is the diffusers pipeline."""

    text_encoder_2: Optional[torch.nn.Module] = None
    tokenizer_2: Optional[object] = None
    text_encoder_3: Optional[torch.nn.Module] = None
    tokenizer_3: Optional[object] = None
    pipeline_name: str = "StableDiffusion3Pipeline"
    guidance: float = 3.5
    max_sequence_length: int = 256

    @property
    def is_flux(self) -> bool:
        return self.pipeline_name == "FluxPipeline"

    def pipeline(self):
        """The diffusers pipeline over these components (shared, not copied)."""
        names = TEXT[:4] if self.is_flux else TEXT
        parts = {name: getattr(self, name) for name in names}
        return getattr(diffusers, self.pipeline_name)(transformer=self.unet, scheduler=self.scheduler.scheduler,
                                                      vae=self.vae, **parts)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The packed conditioning (B, L + rows, D) of `prompts` (module docstring)."""
        if self.text_encoder is None or self.text_encoder_2 is None or self.unet is None:
            raise ValueError(f"{self.pipeline_name}'s encode_prompts needs the transformer and its CLIP / T5 text "
                             "encoders; load them with load_flow (free_text_encoders only after encoding)")
        pipe = self.pipeline()
        if self.is_flux:
            tokens, pooled, _ = pipe.encode_prompt(list(prompts), max_sequence_length=self.max_sequence_length)
            return pack_vectors(tokens, pooled, torch.full((len(prompts), 1), self.guidance))
        tokens, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length)
        return pack_vectors(tokens, pooled)

    def latent_hw(self, resolution) -> tuple[int, int]:
        """Latent (height, width) of `resolution` pixels (None: the model's native size): height and width
        multiples of the VAE's downsampling times 2 (SD3's 2x2 patches, FLUX's 2x2 packing)."""
        scale = vae_scale(self.vae.config)
        if resolution is None:
            native = FLUX_NATIVE_LATENT if self.is_flux else self.unet.config.sample_size
            return (native, native)
        hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % (2 * scale) for v in hw):
            raise ValueError(f"resolution={resolution!r}: height and width must be positive multiples of {2 * scale} "
                             f"pixels for this {self.pipeline_name} model (its VAE downsamples {scale}x, its "
                             "transformer takes 2x2 patches)")
        return (hw[0] // scale, hw[1] // scale)

    def set_resolution(self, resolution) -> tuple[int, int]:
        """`latent_hw`, and the sampler's token count for a resolution-dependent shift (FLUX's)."""
        latent_hw = self.latent_hw(resolution)
        self.scheduler.set_image_seq_len(math.prod(v // 2 for v in latent_hw))  # one token per 2x2 patch
        return latent_hw

    def free_text_encoders(self) -> None:
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write the folder the family's pipeline `from_pretrained` and `load_flow` read (safetensors).
        The transformer must not carry a LoRA adapter (save that with `lora.save_lora`)."""
        if has_lora(self.unet):
            raise ValueError("the transformer has a LoRA adapter; save the base pipeline before add_lora and the "
                             "adapter with save_lora")
        self.pipeline().save_pretrained(directory, safe_serialization=True)
        return Path(directory)


def load_flow(path: Union[str, Path], dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
              t5: bool = True) -> FlowModels:
    """Load SD3 / SD3.5 or FLUX from a LOCAL diffusers folder (what the pipeline's `save_pretrained`
    writes; never the network), frozen and in eval mode, the scheduler as a FlowSampler. `t5=False`
    leaves SD3's T5 encoder out (FLUX needs its T5)."""
    check_dtype(dtype)
    path = Path(path)
    name = pipeline_class(path)
    if name not in FLOW_PIPELINES:
        raise ValueError(f"{path} is not an SD3 or FLUX diffusers folder: its model_index.json names {name!r}, "
                         f"not one of {FLOW_PIPELINES}")
    if not t5 and name == "FluxPipeline":
        raise ValueError("FLUX conditions on T5's tokens only: it cannot be loaded with t5=False")
    skip = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    try:
        pipe = getattr(diffusers, name).from_pretrained(path, dtype=dtype, local_files_only=True, **skip)
    except Exception as e:  # name the folder: the library message alone rarely says which one
        raise ValueError(f"could not load {name} from {path}: {type(e).__name__}: {e}") from e
    parts = {part: getattr(pipe, part, None) for part in TEXT}
    for module in [pipe.transformer, pipe.vae, *parts.values()]:
        if isinstance(module, torch.nn.Module):
            module.to(device).eval().requires_grad_(False)
    flux = name == "FluxPipeline"
    return FlowModels(unet=pipe.transformer, vae=pipe.vae, scheduler=FlowSampler(pipe.scheduler, linear_sigmas=flux),
                      path=path, pipeline_name=name, max_sequence_length=512 if flux else 256, **parts)


def sd35_medium_config() -> dict[str, dict]:
    """Constructor configs of Stable Diffusion 3.5 Medium's transformer (MMDiT-X: 24 joint blocks of width
    1536, the first 13 with a second, image-only attention; qk RMS-norm), VAE (16 latent channels) and
    three text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text with their projections, T5 v1.1
    XXL's encoder), written out from stabilityai/stable-diffusion-3.5-medium's config files so that the
    memory planner builds the shapes without the download (tests/test_plan.py checks the parameter
    counts). A fresh dict each call."""
    clip = dict(architectures=["CLIPTextModelWithProjection"], vocab_size=49408, max_position_embeddings=77,
                layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return {
        "unet": dict(
            _class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, out_channels=16,
            num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
        "vae": dict(
            sample_size=1024, in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", scaling_factor=1.5305,
            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
        ),
        "text_encoder": dict(clip, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
        "text_encoder_2": dict(clip, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
        "text_encoder_3": dict(architectures=["T5EncoderModel"], vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                               num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                               relative_attention_num_buckets=32, layer_norm_epsilon=1e-6),
    }


def tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float, sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=latent_channels,
        layers_per_block=1, norm_num_groups=8, sample_size=2 * sample_size, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_text(tokenizer, width: int, projection: Optional[int] = None):
    config = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  max_position_embeddings=77, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if projection is None:
        return CLIPTextModel(CLIPTextConfig(**config))
    return CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=projection))


def tiny_t5(tokenizer, width: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=2, pad_token_id=tokenizer.pad_token_id))


def tiny_flow(kind: str = "sd3", seed: int = 0, *, sample_size: int = 8) -> FlowModels:
    """A randomly initialised SD3 (`kind="sd3"`: SD3.5's qk-norm, three text encoders) or FLUX
    (`kind="flux"`: guidance embedding, CLIP + T5) at toy width, built offline, with the family's
    scheduler config (SD3.5: shift 3; FLUX: dynamic shifting). The T5 slots hold the byte-level CLIP
    tokenizer (no T5 vocabulary offline; the pipelines only pad and truncate with it). Images are
    2 * sample_size pixels; weights depend only on `seed`."""
    if kind not in ("sd3", "flux"):
        raise ValueError(f"kind must be 'sd3' or 'flux', got {kind!r}")
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "sd3":
            transformer = SD3Transformer2DModel(
                sample_size=sample_size, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                out_channels=16, pos_embed_max_size=4 * sample_size, qk_norm="rms_norm", dual_attention_layers=(0,))
            vae = tiny_vae(16, 1.5305, 0.0609, sample_size)
            text = dict(text_encoder=tiny_text(tokenizer, 16, 8), text_encoder_2=tiny_text(tokenizer, 16, 8),
                        text_encoder_3=tiny_t5(tokenizer, 32), tokenizer_3=tokenizer)
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        else:
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                axes_dims_rope=(2, 2, 4))
            vae = tiny_vae(16, 0.3611, 0.1159, sample_size)
            text = dict(text_encoder=tiny_text(tokenizer, 16), text_encoder_2=tiny_t5(tokenizer, 32))
            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
    for module in [transformer, vae, *(m for m in text.values() if isinstance(m, torch.nn.Module))]:
        module.eval().requires_grad_(False)
    flux = kind == "flux"
    return FlowModels(unet=transformer, vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer, **text,
                      scheduler=FlowSampler(scheduler, linear_sigmas=flux),
                      pipeline_name="FluxPipeline" if flux else "StableDiffusion3Pipeline", max_sequence_length=16)
