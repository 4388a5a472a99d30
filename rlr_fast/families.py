"""Model families: how each denoising network is called with its conditioning, and whose LoRA it is.

The adapter's contract (docs/architecture.md, "Model families"):

* Conditioning is ONE tensor per sample, (B, L, D): the text tokens, and for a family whose network
  takes more than tokens, extra rows after them holding its other per-sample vectors (SDXL: the
  pooled text embedding and the micro-conditioning time ids), laid out by the family's `pack` and
  taken apart again by its `call`, right before the network runs. Everything between the prompt
  encoder and the network (rollout, prompt schedules, guidance batching, select / concat, CUDA-graph
  buffers, the sweeps, SQDF's states, the replay buffer, checkpoints) moves that tensor along its
  batch dimension and never looks inside: estimators never see the family.
* `call(model, sample, timestep, cond)` runs the network and returns its raw output;
  rollout.predict checks its shape and dtype.
* `lora_pipeline` / `lora_prefix`: the diffusers pipeline whose `load_lora_weights` reads the saved
  LoRA, and the key prefix of the network's entries in that file (rlr_fast.lora).
* `latent_layout`: the dimensions of the latents the network takes (None: only a batch dimension).
* For the memory planner (rlr_fast/plan), which builds the network on the meta device from its config:
  `text_encoders` (the folder's prompt encoders), `conditioning_shape(model)` (one sample's
  conditioning rows and width) and `vae_dtype(vae_config, dtype)` (the precision the family's loader
  gives the VAE). A flow family overrides them with its own (SD3: three text encoders, its token and
  pooled rows; its loader keeps the VAE in the run's dtype, as StableDiffusion3Pipeline runs it).

`family_of(model)` picks the family from the network's class (base classes included) and config,
by name, so this module imports torch only. The flow transformers: SD3 packs its `pooled_projections`
after the tokens (`pack_vectors`); FLUX packs its pooled projection and guidance value, derives
txt_ids / img_ids from the token count and the latent shape, and packs / unpacks its 2x2 latent
patches inside `call` (`latent_channels`: the chain holds the VAE's 16 channels, not the 64 of a patch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

IMAGE = ("batch", "channels", "height", "width")
VIDEO = ("batch", "channels", "frames", "height", "width")


@dataclass(frozen=True)
class Family:
    """Stable Diffusion 1.x-style networks: `model(sample, t, encoder_hidden_states=cond)`."""

    name: str
    classes: tuple[str, ...]  # class names (or base class names) of the networks of this family
    lora_pipeline: str = "StableDiffusionPipeline"
    lora_prefix: str = "unet"
    latent_layout: Optional[tuple[str, ...]] = IMAGE
    text_encoders: tuple[str, ...] = ("text_encoder",)
    prompt_tokens: int = 77  # CLIP's padded prompt length

    def matches(self, model) -> bool:
        return any(cls.__name__ in self.classes for cls in type(model).__mro__)

    def conditioning_shape(self, model) -> tuple[int, int]:
        """(rows, width) of one sample's conditioning tensor, as the prompt encoder makes it for `model`."""
        return self.prompt_tokens, model.config.cross_attention_dim

    def vae_dtype(self, vae_config: dict, dtype: torch.dtype) -> torch.dtype:
        """The dtype this family's loader gives a VAE with `vae_config` in a run of `dtype`."""
        return dtype

    def call(self, model, sample: torch.Tensor, timestep: torch.Tensor, cond: Optional[torch.Tensor]):
        return model(sample, timestep, encoder_hidden_states=cond)

    def check_conditioning(self, model, cond: Optional[torch.Tensor]) -> None:
        """Refuse conditioning this family's `call` would misread (checked once per rollout)."""

    def latent_channels(self, model) -> Optional[int]:
        """The channels of the latents the chain holds (None: not said by the network's config)."""
        return getattr(getattr(model, "config", None), "in_channels", None)


@dataclass(frozen=True)
class PerFrameFamily(Family):
    """AnimateDiff's UNetMotionModel takes one prompt embedding per frame, (B * F, L, D), as its
    pipeline passes it."""

    def call(self, model, sample, timestep, cond):
        if cond is not None:
            cond = cond.repeat_interleave(sample.shape[2], dim=0)
        return model(sample, timestep, encoder_hidden_states=cond)


TIME_IDS = 6  # SDXL's micro-conditioning: original (h, w), crop top-left (y, x), target (h, w)


@dataclass(frozen=True)
class TextTimeFamily(Family):
    """SDXL: a network whose config says addition_embed_type="text_time" (whatever its class: SDXL's
    UNet2DConditionModel, a test's toy) also takes `added_cond_kwargs` text_embeds (B, P), the second
    text encoder's pooled embedding, and time_ids (B, 6). They ride in the conditioning as
    ceil((P + 6) / D) extra rows after the tokens, zero-padded."""

    def matches(self, model) -> bool:
        return getattr(getattr(model, "config", None), "addition_embed_type", None) == "text_time"

    @staticmethod
    def pooled_dim(model) -> int:
        """P: the added embedding's input is P + 6 time-id embeddings of addition_time_embed_dim each."""
        config = model.config
        return config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim

    @staticmethod
    def extra_rows(pooled_dim: int, width: int) -> int:
        return math.ceil((pooled_dim + TIME_IDS) / width)

    def pack(self, tokens: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens, (B, P) pooled embeddings and (B, 6) time ids as one (B, L + rows, D) tensor."""
        batch, _, width = tokens.shape
        rows = self.extra_rows(text_embeds.shape[1], width)
        extra = tokens.new_zeros(batch, rows * width)
        extra[:, :text_embeds.shape[1]] = text_embeds
        extra[:, text_embeds.shape[1]:text_embeds.shape[1] + TIME_IDS] = time_ids
        return torch.cat([tokens, extra.reshape(batch, rows, width)], 1)

    def conditioning_shape(self, model) -> tuple[int, int]:
        width = model.config.cross_attention_dim
        return self.prompt_tokens + self.extra_rows(self.pooled_dim(model), width), width

    def vae_dtype(self, vae_config: dict, dtype: torch.dtype) -> torch.dtype:
        """float32 when the VAE's config says force_upcast (SDXL 1.0's overflows in fp16; the fp16-fix
        VAE says false), as StableDiffusionXLPipeline upcasts it before decoding."""
        return torch.float32 if vae_config.get("force_upcast", True) else dtype

    def unpack(self, model, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`pack`'s inverse: (tokens, text_embeds, time_ids)."""
        pooled = self.pooled_dim(model)
        rows = self.extra_rows(pooled, cond.shape[-1])
        extra = cond[:, -rows:].flatten(1)
        return cond[:, :-rows], extra[:, :pooled], extra[:, pooled:pooled + TIME_IDS]

    def call(self, model, sample, timestep, cond):
        if cond is None:
            raise ValueError(f"{type(model).__name__} takes text_time added conditions: it needs conditioning "
                             "(rlr_fast.sdxl.SDXLModels.encode_prompts packs them)")
        tokens, text_embeds, time_ids = self.unpack(model, cond)
        return model(sample, timestep, encoder_hidden_states=tokens,
                     added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})

    def check_conditioning(self, model, cond):
        if cond is None:
            return
        pooled, width = self.pooled_dim(model), cond.shape[-1]
        rows = self.extra_rows(pooled, width)
        padding = cond[:, -rows:].flatten(1)[:, pooled + TIME_IDS:]
        # a meta tensor (the memory planner's) has a shape but no values to look at
        if cond.shape[1] <= rows or (not cond.is_meta and bool(padding.any())):
            raise ValueError(
                f"{type(model).__name__} takes SDXL's added conditions (pooled text embedding and time ids), "
                f"packed after the tokens: conditioning (B, L + {rows}, {width}) as "
                "rlr_fast.sdxl.SDXLModels.encode_prompts makes it, or rlr_fast.families.SDXL.pack(tokens, "
                f"text_embeds, time_ids); got shape {tuple(cond.shape)} whose last row is not such a packing")


def pack_vectors(tokens: torch.Tensor, *vectors: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens and per-sample vectors (B, n_i) as one (B, L + rows, D) tensor: the vectors side by
    side in ceil(sum n_i / D) zero-padded rows after the tokens."""
    batch, _, width = tokens.shape
    flat = torch.cat([v.to(tokens.dtype).reshape(batch, -1) for v in vectors], 1)
    rows = math.ceil(flat.shape[1] / width)
    extra = torch.cat([flat, flat.new_zeros(batch, rows * width - flat.shape[1])], 1)
    return torch.cat([tokens, extra.reshape(batch, rows, width)], 1)


def unpack_vectors(cond: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """`pack_vectors`' inverse: (tokens, vector_1, ...) of the given sizes."""
    rows = math.ceil(sum(sizes) / cond.shape[-1])
    extra = cond[:, -rows:].flatten(1)
    return (cond[:, :-rows], *extra[:, :sum(sizes)].split(list(sizes), 1))


def require_conditioning(model, cond: Optional[torch.Tensor]) -> None:
    if cond is None:
        raise ValueError(f"{type(model).__name__} needs conditioning: its tokens and the vectors packed after them "
                         "(rlr_fast.flow.FlowModels.encode_prompts makes it)")


def check_packed(model, cond: torch.Tensor, sizes: tuple[int, ...], what: str, encoder: str) -> None:
    """Refuse conditioning that is not tokens plus `pack_vectors` rows of `sizes` (their padding is zero)."""
    rows = math.ceil(sum(sizes) / cond.shape[-1])
    padding = cond[:, -rows:].flatten(1)[:, sum(sizes):]
    # a meta tensor (the memory planner's) has a shape but no values to look at
    if cond.shape[1] <= rows or (not cond.is_meta and bool(padding.any())):
        raise ValueError(f"{type(model).__name__} takes {what} packed after the tokens: conditioning (B, L + {rows}, "
                         f"{cond.shape[-1]}) as {encoder} makes it; got shape {tuple(cond.shape)} whose last rows "
                         "are not such a packing")


def batch_timestep(timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """One time per sample (the transformers' time embedding takes a (B,) tensor), as the pipelines pass it."""
    timestep = torch.as_tensor(timestep)
    return timestep.expand(batch) if timestep.dim() == 0 else timestep


@dataclass(frozen=True)
class SD3Family(Family):
    """SD3 / SD3.5's SD3Transformer2DModel: tokens (CLIP-L and CLIP-G side by side, padded to T5's width,
    then T5's) and `pooled_projections` (B, P), packed after them (`pack_vectors`); timesteps as
    StableDiffusion3Pipeline passes them (sigma * 1000). For the planner: CLIP-L, CLIP-G and T5 as the
    text encoders, and one sample's conditioning as the pipeline pads it, 77 CLIP tokens then
    `t5_tokens` (its max_sequence_length), then the pooled row(s)."""

    t5_tokens: int = 256  # StableDiffusion3Pipeline's max_sequence_length, as load_flow keeps it

    def conditioning_shape(self, model) -> tuple[int, int]:
        width = model.config.joint_attention_dim
        return self.prompt_tokens + self.t5_tokens + math.ceil(model.config.pooled_projection_dim / width), width

    def call(self, model, sample, timestep, cond):
        require_conditioning(model, cond)
        tokens, pooled = unpack_vectors(cond, (model.config.pooled_projection_dim,))
        return model(hidden_states=sample, timestep=batch_timestep(timestep, len(sample)), encoder_hidden_states=tokens,
                     pooled_projections=pooled, return_dict=False)[0]

    def check_conditioning(self, model, cond):
        if cond is not None:
            check_packed(model, cond, (model.config.pooled_projection_dim,), "pooled projections",
                         "rlr_fast.flow.FlowModels.encode_prompts")


@dataclass(frozen=True)
class FluxFamily(Family):
    """FLUX's FluxTransformer2DModel: T5 tokens, the pooled CLIP embedding (B, P) and the distilled
    guidance value (B,) packed after them. The chain keeps the latents (B, C, h, w) as the VAE reads
    them; `call` packs them into 2x2 patches (B, hw / 4, 4C) with their position ids, and back, and
    divides the timestep by 1000, as FluxPipeline."""

    def latent_channels(self, model) -> int:
        return model.config.in_channels // 4

    def sizes(self, model) -> tuple[int, int]:
        return (model.config.pooled_projection_dim, 1)

    def call(self, model, sample, timestep, cond):
        require_conditioning(model, cond)
        tokens, pooled, guidance = unpack_vectors(cond, self.sizes(model))
        b, c, h, w = sample.shape
        patches = sample.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        # built on the sample's device: no host-to-device copy, so the call can be captured in a CUDA graph
        rows, cols = torch.meshgrid(*(torch.arange(n // 2, device=sample.device, dtype=sample.dtype) for n in (h, w)),
                                    indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
        txt_ids = tokens.new_zeros(tokens.shape[1], 3)
        out = model(hidden_states=patches, timestep=batch_timestep(timestep, b) / 1000,
                    guidance=guidance[:, 0].float() if model.config.guidance_embeds else None,
                    pooled_projections=pooled, encoder_hidden_states=tokens, txt_ids=txt_ids, img_ids=img_ids,
                    return_dict=False)[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def check_conditioning(self, model, cond):
        if cond is not None:
            check_packed(model, cond, self.sizes(model), "the pooled projection and guidance value",
                         "rlr_fast.flow.FlowModels.encode_prompts")


SD = Family("sd", ("UNet2DConditionModel",))
SDXL = TextTimeFamily("sdxl", (), lora_pipeline="StableDiffusionXLPipeline",
                      text_encoders=("text_encoder", "text_encoder_2"))
MODELSCOPE = Family("modelscope", ("UNet3DConditionModel",), lora_pipeline="TextToVideoSDPipeline",
                    latent_layout=VIDEO)
ANIMATEDIFF = PerFrameFamily("animatediff", ("UNetMotionModel",), lora_pipeline="AnimateDiffPipeline",
                             latent_layout=VIDEO)
SD3 = SD3Family("sd3", ("SD3Transformer2DModel",), lora_pipeline="StableDiffusion3Pipeline", lora_prefix="transformer",
                text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"))
FLUX = FluxFamily("flux", ("FluxTransformer2DModel",), lora_pipeline="FluxPipeline", lora_prefix="transformer")
# Any other module called as model(sample, t, encoder_hidden_states=...): the toy models, custom networks.
OTHER = Family("other", (), latent_layout=None)

# The most specific first: SDXL's UNet is a UNet2DConditionModel too.
FAMILIES = (SDXL, ANIMATEDIFF, MODELSCOPE, SD, SD3, FLUX)


def family_of(model) -> Family:
    """The family whose adapter calls `model` (OTHER for a network none of them knows)."""
    return next((family for family in FAMILIES if family.matches(model)), OTHER)
