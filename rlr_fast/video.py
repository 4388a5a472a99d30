"""Text-to-video diffusion models: local diffusers folders, tiny offline builders, and saving.

Two families of video UNet, both taking latents (B, C, F, H, W) (F frames) and predicting the noise
of every frame, so rollout, recompute and every estimator run on them unchanged:

* ModelScope text-to-video (`TextToVideoSDPipeline` folders): a `UNet3DConditionModel`. diffusers
  implements no gradient checkpointing for it (checkpoint_unet=True is refused) and gives it no
  peft mixin (`add_lora` injects peft's layers directly; `TextToVideoSDPipeline.load_lora_weights`
  cannot load a LoRA into it in diffusers 0.42, `rlr_fast.lora.load_lora(pipe.unet, dir)` can).
* AnimateDiff (`AnimateDiffPipeline` folders, or a Stable Diffusion 1.x folder plus a
  `MotionAdapter` folder): a `UNetMotionModel`, an SD1.x UNet with temporal layers. It takes
  one prompt embedding per frame; `rollout` repeats the conditioning F times as the pipeline does.
  Gradient checkpointing and diffusers' peft integration work as on the image UNet, and
  `AnimateDiffPipeline.load_lora_weights` reads what `save_lora` writes.

The VAE, text encoder, tokenizer and scheduler are Stable Diffusion's, loaded by `models.load_sd`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

from .lora import has_lora
from .models import SDModels, load_sd, pipeline_class, tiny_sd

__all__ = ["VIDEO_PIPELINES", "VideoModels", "check_num_frames", "is_video_folder", "is_video_model", "is_video_unet",
           "load_video", "tiny_motion_adapter", "tiny_video", "tiny_video_unet"]

# Pipeline class (model_index.json's _class_name) -> the video UNet class it holds.
VIDEO_PIPELINES = {"TextToVideoSDPipeline": "UNet3DConditionModel", "AnimateDiffPipeline": "UNetMotionModel"}
_KINDS = {"modelscope": "TextToVideoSDPipeline", "animatediff": "AnimateDiffPipeline"}
_SD_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class VideoModels(SDModels):
    """A text-to-video model's components: `unet` is a UNet3DConditionModel or a UNetMotionModel."""

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline these components make: TextToVideoSDPipeline or AnimateDiffPipeline."""
        name = type(self.unet).__name__
        return next(p for p, u in VIDEO_PIPELINES.items() if u == name)

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write the folder the stock diffusers pipeline (`pipeline_class`) and `load_video` read.

        The UNet must not carry a LoRA adapter (its layers would be saved as base weights); save
        the adapter with `lora.save_lora`.
        """
        from diffusers import AnimateDiffPipeline, TextToVideoSDPipeline

        missing = [name for name in ("unet",) + _SD_PARTS if getattr(self, name) is None]
        if missing:
            raise ValueError(f"save_pretrained needs the unet and {_SD_PARTS}; missing: {missing}")
        if has_lora(self.unet):
            raise ValueError("the UNet has a LoRA adapter; save the base model before add_lora and the adapter "
                             "with save_lora")
        parts = {name: getattr(self, name) for name in ("unet",) + _SD_PARTS}
        if isinstance(self.unet, UNetMotionModel):
            pipe = AnimateDiffPipeline(motion_adapter=None, **parts)
        else:
            pipe = TextToVideoSDPipeline(**parts)
        pipe.save_pretrained(directory, safe_serialization=True)
        return Path(directory)


def is_video_folder(path: Union[str, Path]) -> bool:
    """Whether `path` is a diffusers folder of a video pipeline `load_video` reads."""
    return pipeline_class(Path(path)) in VIDEO_PIPELINES


def is_video_model(model: Union[str, Path], motion_adapter: Union[str, Path, None] = None) -> bool:
    """Whether `load_video` is the loader of this model (a folder path; "default" is an image model)."""
    return motion_adapter is not None or (str(model) != "default" and is_video_folder(model))


def is_video_unet(unet) -> bool:
    """Whether `unet` denoises video latents (B, C, F, H, W)."""
    return isinstance(unet, (UNet3DConditionModel, UNetMotionModel))


def check_num_frames(unet, num_frames: int) -> None:
    """Refuse a clip length the video UNet cannot denoise (AnimateDiff's temporal layers have
    positions for motion_max_seq_length frames)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    max_frames = getattr(unet.config, "motion_max_seq_length", None)
    if max_frames is not None and num_frames > max_frames:
        raise ValueError(f"num_frames={num_frames} exceeds this motion model's motion_max_seq_length "
                         f"({max_frames}), the longest clip its temporal layers have positions for")


def _unet_class(path: Path) -> Optional[str]:
    config = path / "unet" / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"component 'unet' is missing: no file {config}")
    return json.loads(config.read_text(encoding="utf-8")).get("_class_name")


def _load(cls, folder: Path, dtype: torch.dtype):
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    except Exception as e:  # name the folder: the library message alone rarely says which one
        raise ValueError(f"could not load a {cls.__name__} from {folder}: {type(e).__name__}: {e}") from e


def _load_unet(path: Path, motion_adapter: Optional[Path], dtype: torch.dtype):
    """The folder's video UNet; an image UNet joined with a MotionAdapter into a UNetMotionModel."""
    name = _unet_class(path)
    classes = {cls.__name__: cls for cls in (UNet3DConditionModel, UNetMotionModel, UNet2DConditionModel)}
    if name not in classes:
        raise ValueError(f"{path / 'unet'} holds a {name}; a video model needs a UNet3DConditionModel, a "
                         "UNetMotionModel, or a UNet2DConditionModel and a MotionAdapter")
    unet = _load(classes[name], path / "unet", dtype)
    if name != "UNet2DConditionModel":
        return unet
    adapter = motion_adapter or (path / "motion_adapter")
    if not (adapter / "config.json").is_file():
        raise ValueError(f"{path} has an image UNet (UNet2DConditionModel) and no motion adapter: pass "
                         "motion_adapter=<a diffusers MotionAdapter folder> (e.g. AnimateDiff's motion module for "
                         "SD1.5) to make it a video model")
    return UNetMotionModel.from_unet2d(unet, _load(MotionAdapter, adapter, dtype)).to(dtype)


def load_video(path: Union[str, Path], dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
               *, motion_adapter: Union[str, Path, None] = None) -> VideoModels:
    """Load a text-to-video model from a LOCAL diffusers folder, frozen and in eval mode.

    The folder is one a `TextToVideoSDPipeline` or an `AnimateDiffPipeline` saved, or a Stable
    Diffusion 1.x folder when `motion_adapter` names a `MotionAdapter` folder (AnimateDiff's usual
    form: SD1.5 weights plus a motion module). The scheduler is loaded as a DDIMScheduler, as
    `load_sd` does.
    """
    path = Path(path)
    if motion_adapter is not None:
        motion_adapter = Path(motion_adapter)
        if not motion_adapter.is_dir():
            raise FileNotFoundError(f"motion adapter folder {motion_adapter} does not exist")
    parts = load_sd(path, dtype=dtype, device=device, components=_SD_PARTS)
    unet = _load_unet(path, motion_adapter, dtype).to(device).eval().requires_grad_(False)
    return VideoModels(unet=unet, **{name: getattr(parts, name) for name in _SD_PARTS}, path=path)


def tiny_video_unet(kind: str = "modelscope", seed: int = 0, *, sample_size: int = 8,
                    cross_attention_dim: int = 32) -> Union[UNet3DConditionModel, UNetMotionModel]:
    """A randomly initialised video UNet at toy width, frozen: kind "modelscope" (UNet3DConditionModel)
    or "animatediff" (`tiny_sd`'s UNet with a MotionAdapter, as a UNetMotionModel). Weights depend
    only on `seed` and leave the global RNG untouched."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "modelscope":
            unet = UNet3DConditionModel(
                sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=cross_attention_dim,
                attention_head_dim=8, norm_num_groups=8,
            )
        else:
            image_unet = tiny_sd(seed, sample_size=sample_size, cross_attention_dim=cross_attention_dim).unet
            unet = UNetMotionModel.from_unet2d(image_unet, tiny_motion_adapter(seed))
    return unet.eval().requires_grad_(False)


def tiny_motion_adapter(seed: int = 0) -> MotionAdapter:
    """A random MotionAdapter (temporal layers) for `tiny_sd`'s UNet, at most 16 frames."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                             motion_norm_num_groups=8, motion_max_seq_length=16)


def tiny_video(kind: str = "modelscope", seed: int = 0, *, sample_size: int = 8) -> VideoModels:
    """`tiny_sd`'s VAE, text encoder, tokenizer and DDIM scheduler with a `tiny_video_unet`: a whole
    text-to-video model that builds offline in about a second, for tests and CI."""
    parts = tiny_sd(seed, sample_size=sample_size)
    unet = tiny_video_unet(kind, seed, sample_size=sample_size,
                           cross_attention_dim=parts.text_encoder.config.hidden_size)
    return VideoModels(unet=unet, **{name: getattr(parts, name) for name in _SD_PARTS})
