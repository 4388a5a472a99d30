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
  gives the VAE). A flow family overrides them with its own.

`family_of(model)` picks the family from the network's class (base classes included) and config,
by name, so this module imports torch only. A flow transformer is one more `Family`: SD3 packs its
`pooled_projections` as SDXL packs text_embeds; FLUX packs its pooled projection and guidance value,
derives txt_ids / img_ids from the token count and the latent shape, and packs / unpacks its 2x2
latent patches inside `call`.
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


SD = Family("sd", ("UNet2DConditionModel",))
SDXL = TextTimeFamily("sdxl", (), lora_pipeline="StableDiffusionXLPipeline",
                      text_encoders=("text_encoder", "text_encoder_2"))
MODELSCOPE = Family("modelscope", ("UNet3DConditionModel",), lora_pipeline="TextToVideoSDPipeline",
                    latent_layout=VIDEO)
ANIMATEDIFF = PerFrameFamily("animatediff", ("UNetMotionModel",), lora_pipeline="AnimateDiffPipeline",
                             latent_layout=VIDEO)
# Any other module called as model(sample, t, encoder_hidden_states=...): the toy models, custom networks.
OTHER = Family("other", (), latent_layout=None)

# The most specific first: SDXL's UNet is a UNet2DConditionModel too.
FAMILIES = (SDXL, ANIMATEDIFF, MODELSCOPE, SD)


def family_of(model) -> Family:
    """The family whose adapter calls `model` (OTHER for a network none of them knows)."""
    return next((family for family in FAMILIES if family.matches(model)), OTHER)
