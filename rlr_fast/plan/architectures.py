"""The networks of one update, built on the meta device: real shapes, no memory, no weights.

A model is described by its component configs {"unet", "vae"} and its family's text encoders
("text_encoder"; SDXL's also "text_encoder_2"; SD3's also "text_encoder_3", T5): SD1.4's (`"sd14"`),
SDXL 1.0 base's (`"sdxl"`, or `"sdxl-vae-fp16-fix"` with the fp16-fix VAE in place of its own),
SD3.5 Medium's (`"sd35m"`), the embedded default model's (`"default"`), a local diffusers folder's
(only the config.json files are read; a flow folder's `transformer/` stands in the "unet" slot, as
rlr_fast.flow.FlowModels keeps it) or such a dict.
The family (rlr_fast.families, picked from the UNet built on meta) says which text encoders there
are, one sample's conditioning shape and the VAE's precision, so another family supplies its own.
A UNet config's `_class_name` names a video UNet (UNet3DConditionModel, UNetMotionModel); an
image UNet with a MotionAdapter's config becomes the UNetMotionModel AnimateDiff makes of them.
Measurements are cached under `architecture_id`, a hash of the full config with every default
filled in, so a downloaded SD1.4 folder and the built-in "sd14" description share one cache entry.

The rewards the planner knows: "aesthetic" (the LAION aesthetic predictor on CLIP ViT-L/14, the
`sd14` preset's reward) and "pixels" (a reward computed from the pixels without a network).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

REWARDS = ("aesthetic", "pixels")
DENOISER_PARTS = ("unet", "vae")  # then the family's text encoders
# "sdxl": SDXL 1.0 base as released (its VAE in float32); "sdxl-vae-fp16-fix": with the fp16-fix VAE
BUILT_IN = ("sd14", "sdxl", "sdxl-vae-fp16-fix", "sd35m")
# Model folders (by name) whose architecture is built in, for planning where the folder is not.
KNOWN_FOLDERS = {"stable-diffusion-v1-4": "sd14", "stable-diffusion-xl-base-1.0": "sdxl",
                 "stable-diffusion-xl-base-1.0-vae-fp16-fix": "sdxl-vae-fp16-fix",
                 "stable-diffusion-3.5-medium": "sd35m"}
# The flow transformers (rlr_fast.flow), by their config's _class_name.
TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel")
Model = Union[str, Path, dict]


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warning about casting whole models with .to(dtype) (we mean it)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def component_configs(model: Model, motion_adapter: Optional[Union[str, Path]] = None) -> dict[str, dict]:
    """{"unet", "vae", text encoders...} constructor configs of `model` (see the module docstring), the
    UNet's made a UNetMotionModel's with the MotionAdapter folder `motion_adapter`."""
    configs = _component_configs(model)
    if motion_adapter is not None:
        adapter = Path(motion_adapter) / "config.json"
        if not adapter.is_file():
            raise ValueError(f"motion_adapter {str(motion_adapter)!r} is not a MotionAdapter folder (no {adapter})")
        configs["unet"] = motion_unet_config(configs["unet"], json.loads(adapter.read_text()))
    return configs


def motion_unet_config(unet: dict, adapter: dict) -> dict:
    """The config of the UNetMotionModel diffusers makes of an image UNet and a MotionAdapter."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with quiet_diffusers(), torch.device("meta"):
        joined = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_config(unet),
                                             MotionAdapter.from_config(adapter), load_weights=False)
    return dict(joined.config)


def _component_configs(model: Model) -> dict[str, dict]:
    from ..default_model import default_model_path
    from ..flow import sd35_medium_config
    from ..models import sd14_config
    from ..sdxl import sdxl_config

    if isinstance(model, str) and model in BUILT_IN:
        if model == "sd35m":
            return sd35_medium_config()
        return sd14_config() if model == "sd14" else sdxl_config(vae_fp16_fix=model == "sdxl-vae-fp16-fix")
    if isinstance(model, dict):
        names = DENOISER_PARTS + _text_encoders(model)
        missing = [name for name in names if name not in model]
        if missing:
            raise ValueError(f"a model given as a dict needs the configs of {names}; missing {missing}")
        return {name: dict(model[name]) for name in names}
    folder = default_model_path() if model == "default" else Path(model)

    def read(names):
        # a flow pipeline's denoiser is its transformer/ (rlr_fast.flow keeps it in the "unet" slot)
        transformer = (folder / "transformer" / "config.json").is_file()
        files = {name: folder / ("transformer" if name == "unet" and transformer else name) / "config.json"
                 for name in names}
        absent = [str(f) for f in files.values() if not f.is_file()]
        if absent:
            raise ValueError(f"model {str(model)!r} is neither one of {BUILT_IN}, 'default' nor a diffusers folder "
                             f"with {'/'.join(names)} configs (missing {', '.join(absent)})")
        return {name: json.loads(f.read_text()) for name, f in files.items()}

    configs = read(DENOISER_PARTS)
    return {**configs, **read(_text_encoders(configs))}


def _text_encoders(configs: dict) -> tuple[str, ...]:
    return family(configs["unet"]).text_encoders if "unet" in configs else ()


def family(unet_config: dict):
    """The rlr_fast.families Family whose adapter calls the UNet of `unet_config`."""
    return _family(json.dumps(unet_config, sort_keys=True, default=list))


@functools.lru_cache(maxsize=None)
def _family(config_json: str):
    from ..families import family_of

    return family_of(build("unet", json.loads(config_json)))


# Config entries that do not change the computation: file metadata, the stored dtype (the planner
# sets its own), and the UNet's sample_size (every measurement's key holds the latent size).
_NOT_ARCHITECTURE = ("sample_size", "architectures", "torch_dtype", "dtype", "transformers_version")


def _canonical(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in _NOT_ARCHITECTURE}


def build(component: str, config: dict, dtype: torch.dtype = torch.float16) -> nn.Module:
    """One component on meta in `dtype`, frozen, in eval mode: "unet" (a UNet or a flow transformer), "vae",
    or a text encoder: the class its config's `architectures` names (as a folder's config.json does), else
    "text_encoder" CLIPTextModel, "text_encoder_2" CLIPTextModelWithProjection (as SDXL's loader reads
    it), "text_encoder_3" T5EncoderModel (SD3's)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    classes = {cls.__name__: (cls, configs) for cls, configs in (
        (CLIPTextModel, CLIPTextConfig), (CLIPTextModelWithProjection, CLIPTextConfig), (T5EncoderModel, T5Config))}
    text = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection",
            "text_encoder_3": "T5EncoderModel"}
    with quiet_diffusers(), torch.device("meta"):
        if component == "unet":
            module = unet_class(config).from_config(config)
        elif component == "vae":
            module = AutoencoderKL.from_config(config)
        elif component in text:
            named = (config.get("architectures") or [text[component]])[0]
            if named not in classes:
                raise ValueError(f"{component}'s config names {named!r}; the planner builds {sorted(classes)}")
            cls, config_class = classes[named]
            module = cls(config_class.from_dict(config))
        else:
            raise ValueError(f"component must be one of {DENOISER_PARTS + tuple(text)}, got {component!r}")
        return module.to(dtype).eval().requires_grad_(False)


def unet_class(config: dict) -> type:
    """The diffusers class of a denoiser config: its `_class_name` when that is a video UNet or a flow
    transformer, else UNet2DConditionModel."""
    import diffusers
    from diffusers import UNet2DConditionModel

    named = config.get("_class_name")
    if named in ("UNet3DConditionModel", "UNetMotionModel") + TRANSFORMERS:
        return getattr(diffusers, named)
    return UNet2DConditionModel


def latent_size(resolution, configs: dict) -> tuple[int, int]:
    """Latent (height, width) of `resolution` pixels for the model of `configs` (None: its native size):
    components.latent_size for a UNet; for a flow transformer, multiples of the VAE's downsampling
    times 2 (2x2 patches), as rlr_fast.flow.FlowModels.latent_hw."""
    from ..components import latent_size as unet_latent_size

    unet, vae = configs["unet"], configs["vae"]
    if unet.get("_class_name") not in TRANSFORMERS:
        return unet_latent_size(resolution, unet, vae)
    scale, native = 2 ** (len(vae["block_out_channels"]) - 1), unet.get("sample_size", 128)
    if resolution is None:
        return (native, native)
    hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    multiple = 2 * scale
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple for v in hw):
        raise ValueError(f"resolution={resolution!r}: height and width must be positive multiples of {multiple} "
                         f"pixels for this {unet['_class_name']} (its VAE downsamples {scale}x, its transformer "
                         "takes 2x2 patches)")
    return (hw[0] // scale, hw[1] // scale)


def architecture_id(component: str, config: dict) -> str:
    """A short hash of a component's full config, defaults filled in (see _NOT_ARCHITECTURE)."""
    return _architecture_id(component, json.dumps(config, sort_keys=True, default=list))


@functools.lru_cache(maxsize=None)
def _architecture_id(component: str, config_json: str) -> str:
    config = json.loads(config_json)
    module = build(component, config)
    full = module.config.to_dict() if component.startswith("text_encoder") else dict(module.config)
    text = json.dumps(_canonical(full), sort_keys=True, default=str)
    return f"{component}:{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def meta_unet(config: dict, *, dtype: torch.dtype, lora_rank: Optional[int]) -> nn.Module:
    """The UNet on meta, frozen weights in `dtype`, with a float32 LoRA whose .grad exists (as the
    loop accumulates it: gradients are optimizer-resident state, not activations)."""
    from ..lora import add_lora

    unet = build("unet", config, dtype)
    if lora_rank:
        add_lora(unet, rank=lora_rank, alpha=lora_rank)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
                p.grad = torch.zeros_like(p)
    return unet


def aesthetic_architecture(checkpoint_vision: bool = False) -> nn.Module:
    """rewards.clip_models.LaionAesthetic without its weights (CLIP ViT-L/14 vision tower, projection
    and MLP head, built from openai/clip-vit-large-patch14's vision config in the current default
    device and dtype): the reward's own scoring code, for measuring and for random-weight benchmarks.
    `checkpoint_vision` as the reward's option."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..rewards.base import Reward
    from ..rewards.clip_models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, LaionAesthetic, PreferenceHead
    from ..rewards.loading import checkpoint_layers, freeze

    class AestheticArchitecture(LaionAesthetic):
        def __init__(self):
            Reward.__init__(self)
            config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                                      hidden_act="quick_gelu", layer_norm_eps=1e-5)
            clip = CLIPVisionModelWithProjection(config)
            self.vision, self.projection = clip.vision_model, clip.visual_projection
            self.head = PreferenceHead(config.projection_dim)
            self.image_size, self.mean, self.std = config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
            if checkpoint_vision:
                checkpoint_layers(self.vision.encoder.layers)
            freeze(self)

    return AestheticArchitecture()


class PixelReward(nn.Module):
    """A reward computed from the decoded pixels without a network (colour, brightness...)."""

    differentiable = True

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


def as_unchecked_reward(module: nn.Module):
    """The module as an rlr_fast Reward whose call skips the value-range checks (which read values,
    impossible on meta)."""
    from ..rewards.base import Reward

    class Unchecked(Reward):
        differentiable = bool(getattr(module, "differentiable", True))

        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, images, prompts):
            return self.inner.score(images, prompts) if isinstance(self.inner, Reward) else self.inner(images, prompts)

    return Unchecked()


def meta_reward(reward: Union[str, nn.Module], *, dtype: torch.dtype, checkpoint: bool = False) -> nn.Module:
    """The reward's network on meta in `dtype`: a name of REWARDS, or a module already built on meta."""
    if isinstance(reward, nn.Module):
        return reward
    if reward == "aesthetic":
        with torch.device("meta"):
            return aesthetic_architecture(checkpoint_vision=checkpoint).to(dtype)
    if reward == "pixels":
        return PixelReward()
    raise ValueError(f"reward must be one of {REWARDS} or an nn.Module reward(images, prompts) built on the meta "
                     f"device; got {reward!r}")


def reward_id(reward: Union[str, nn.Module]) -> str:
    if isinstance(reward, str):
        return reward
    from ..rollout import model_key

    return f"module:{type(reward).__name__}:{model_key(reward)}"


def module_state(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and existing gradients: what a measurement treats as already there."""
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors + [p.grad for p in module.parameters() if p.grad is not None]


def module_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of tensors' storages, each storage once."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())
