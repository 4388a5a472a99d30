"""Learned preference rewards built on CLIP / BLIP, loaded from LOCAL files only (never downloaded).

Every reward here preprocesses in torch, so gradients reach the images: resize the shortest side
to the model's input size (bicubic, antialiased), centre-crop, normalise with the model's mean/std
(`preprocessor_config.json` when the folder has one, else OpenAI CLIP's). That matches the PIL
pipelines these models were trained with up to resampling details.

Expected files (relative paths resolve from the working directory; the default folder is
$RLR_FAST_WEIGHTS, else ./weights):

  aesthetic    LAION improved aesthetic predictor on CLIP ViT-L/14.
               clip_path: transformers CLIP folder (config.json + model.safetensors) of
                 openai/clip-vit-large-patch14 (default weights/clip-vit-large-patch14).
               head_path: sac+logos+ava1-l14-linearMSE.pth from
                 github.com/christophschuhmann/improved-aesthetic-predictor, or a .safetensors of the
                 same tensors (default weights/sac+logos+ava1-l14-linearMSE.pth).
               score = MLP(image_embedding / |image_embedding|)
  pickscore    path: yuvalkirstain/PickScore_v1 (transformers CLIPModel, ViT-H/14) plus the tokenizer
                 files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (vocab.json + merges.txt, or
                 tokenizer.json) in the same folder (default weights/PickScore_v1).
               score = logit_scale.exp() * cos(image_embedding, text_embedding)  (about 20)
  hpsv2        path: a transformers CLIPModel folder CONVERTED from HPSv2's open_clip ViT-H/14
                 checkpoint (HPS_v2.1_compressed.pt, Hub repo xswu/HPSv2), with the tokenizer files
                 of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (default weights/HPSv2).
                 rlr_fast does not include the open_clip -> transformers conversion.
               score = cos(image_embedding, text_embedding)  (about 0.25-0.3, as HPSv2 reports)
  imagereward  blip_path: a transformers BlipForImageTextRetrieval folder (ViT-L vision tower,
                 vision_config.image_size 224) holding ImageReward's BLIP weights CONVERTED from
                 ImageReward.pt (Hub repo THUDM/ImageReward), plus bert-base-uncased tokenizer files
                 (vocab.txt, tokenizer_config.json) (default weights/ImageReward).
                 rlr_fast does not include the BLIP -> transformers key conversion.
               head_path: ImageReward.pt itself (its mlp.* tensors are read, with
                 torch.load(weights_only=True)) or a .safetensors of layers.* tensors
                 (default weights/ImageReward.pt).
               score = (MLP(text_encoder(prompt, cross-attending to the image)[CLS]) - mean) / std

Reward networks are frozen (requires_grad False, eval mode); move them with `.to(device)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import Reward, register_reward

PathLike = Union[str, os.PathLike]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# ImageReward standardises its raw head output with these statistics (from its reference code).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35


def weights_dir() -> Path:
    """Where the default weight paths live: $RLR_FAST_WEIGHTS, else ./weights."""
    return Path(os.environ.get("RLR_FAST_WEIGHTS", "weights"))


def preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Differentiable CLIP preprocessing: shortest side to `size` (bicubic, antialiased), centre crop, normalise."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized_hw = (max(size, round(height * scale)), max(size, round(width * scale)))
    if resized_hw != (height, width):
        images = F.interpolate(images, size=resized_hw, mode="bicubic", antialias=True, align_corners=False)
    top = (resized_hw[0] - size) // 2
    left = (resized_hw[1] - size) // 2
    images = images[:, :, top:top + size, left:left + size]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean_t) / std_t


def _image_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config_file = folder / "preprocessor_config.json"
    if not config_file.is_file():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    config = json.loads(config_file.read_text())
    return tuple(config.get("image_mean", OPENAI_CLIP_MEAN)), tuple(config.get("image_std", OPENAI_CLIP_STD))


def _require_model_folder(folder: Path, what: str, how: str) -> None:
    """FileNotFoundError saying what to download unless `folder` holds a transformers model."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what}: no config.json in {folder}. {how}")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"{what}: no weights ({' or '.join(_WEIGHT_FILES)}) in {folder}. {how}")


def _require_tokenizer(folder: Path, needed: tuple[tuple[str, ...], ...], what: str, how: str) -> None:
    """FileNotFoundError unless one of the alternative file sets in `needed` is all present."""
    if not any(all((folder / name).is_file() for name in option) for option in needed):
        options = " or ".join(" + ".join(option) for option in needed)
        raise FileNotFoundError(f"{what}: no tokenizer files ({options}) in {folder}. {how}")


def _load_pretrained(model_class: type, folder: Path, model_type: str, needed_prefixes: tuple[str, ...],
                     dtype: torch.dtype, what: str, how: str) -> nn.Module:
    """`model_class.from_pretrained(folder)`, refusing a folder of another architecture or one that
    leaves any weight under `needed_prefixes` at its random initialisation."""
    found = json.loads((folder / "config.json").read_text()).get("model_type")
    if found != model_type:
        raise ValueError(f"{what}: {folder} holds a {found!r} model, expected a transformers {model_class.__name__} "
                         f"(model_type {model_type!r}). {how}")
    model, info = model_class.from_pretrained(folder, dtype=dtype, local_files_only=True, output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"] if k.startswith(needed_prefixes))
    if missing:
        raise ValueError(f"{what}: {folder} lacks {len(missing)} of the weights it needs (e.g. {missing[:3]}); scoring "
                         f"would use random weights there. {how}")
    return model


def _device_of(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


class PreferenceHead(nn.Module):
    """The MLP head shared by the LAION aesthetic predictor and ImageReward.

    Five Linear layers with dropout between the first four and no activation (the reference
    implementations leave their ReLUs commented out), so it is affine in its input. Parameter
    names (layers.0, .2, .4, .6, .7) match both released state dicts.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


def load_head(path: Path, in_features: int, what: str, how: str) -> PreferenceHead:
    """A PreferenceHead from .safetensors or a tensors-only .pth/.pt (torch.load(weights_only=True)).

    Reads the `layers.*` tensors; a full ImageReward checkpoint keeps them under `mlp.`.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what}: head file {path} not found. {how}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary pickles; say so instead of a pickle trace
            raise ValueError(f"{what}: {path} is not a plain tensor state dict loadable with "
                             f"torch.load(weights_only=True): {e}") from e
    else:
        raise ValueError(f"{what}: head file {path} must be .safetensors or .pth/.pt, got suffix {path.suffix!r}")
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, expected a state dict of tensors")
    strip = "mlp." if any(k.startswith("mlp.layers.") for k in state) else ""
    head_state = {k[len(strip):]: v for k, v in state.items() if k.startswith(strip + "layers.")}
    if "layers.0.weight" not in head_state:
        raise ValueError(f"{what}: {path} has no MLP head tensors (layers.0.weight ...); keys start "
                         f"{sorted(state)[:5]}")
    found_in = head_state["layers.0.weight"].shape[1]
    if found_in != in_features:
        raise ValueError(f"{what}: head {path} takes {found_in}-dim features but the model gives {in_features}; "
                         "head and backbone do not belong together")
    head = PreferenceHead(in_features)
    try:
        head.load_state_dict(head_state)
    except RuntimeError as e:
        raise ValueError(f"{what}: head tensors in {path} do not fit the 5-layer MLP head: {e}") from e
    return head


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False).eval()


@register_reward("aesthetic")
class LaionAesthetic(Reward):
    """LAION improved aesthetic predictor: CLIP image embedding, L2-normalised, through the MLP head.

    The head's input size follows the CLIP projection size (768 for ViT-L/14), so any CLIP works.
    """

    differentiable = True
    WHAT = "LAION aesthetic reward"

    def __init__(self, clip_path: Optional[PathLike] = None, head_path: Optional[PathLike] = None, *,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        from transformers import CLIPModel

        clip_path = Path(clip_path) if clip_path is not None else weights_dir() / "clip-vit-large-patch14"
        head_path = Path(head_path) if head_path is not None else weights_dir() / "sac+logos+ava1-l14-linearMSE.pth"
        how = ("Download the Hugging Face repo openai/clip-vit-large-patch14 (config.json, model.safetensors, "
               "preprocessor_config.json) into that folder, or pass clip_path=<folder>.")
        _require_model_folder(clip_path, self.WHAT, how)
        clip = _load_pretrained(CLIPModel, clip_path, "clip", ("vision_model.", "visual_projection."), dtype,
                                self.WHAT, how)
        # Only the image side scores; the text tower is dropped with `clip`.
        self.vision = clip.vision_model
        self.projection = clip.visual_projection
        self.head = load_head(head_path, clip.config.projection_dim, self.WHAT, (
            "Download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor "
            "and put it there, or pass head_path=<file>."))
        self.image_size = clip.config.vision_config.image_size
        self.mean, self.std = _image_stats(clip_path)
        _freeze(self)
        self.to(device)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device, dtype = _device_of(self.vision)
        pixels = preprocess(images.to(device=device, dtype=dtype), self.image_size, self.mean, self.std)
        embedding = self.projection(self.vision(pixel_values=pixels).pooler_output)
        embedding = F.normalize(embedding.float(), dim=-1)
        return self.head(embedding).to(images.device)


class ClipSimilarity(Reward):
    """`scale * cos(image_embedding, text_embedding)` of a transformers CLIPModel (PickScore, HPSv2).

    `use_logit_scale`: scale by the model's learned temperature exp(logit_scale) (PickScore) or by 1
    (HPSv2). Prompts are tokenised to the text tower's length and encoded without gradients.
    """

    differentiable = True

    def __init__(self, path: PathLike, *, use_logit_scale: bool, what: str, how: str,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(path)
        _require_model_folder(path, what, how)
        _require_tokenizer(path, (("tokenizer.json",), ("vocab.json", "merges.txt")), what, how)
        self.model = _load_pretrained(CLIPModel, path, "clip", ("",), dtype, what, how)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.max_tokens = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.use_logit_scale = use_logit_scale
        self.image_size = self.model.config.vision_config.image_size
        self.mean, self.std = _image_stats(path)
        _freeze(self)
        self.to(device)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device, dtype = _device_of(self.model)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt").to(device)
        with torch.no_grad():
            text = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            text_embedding = F.normalize(self.model.text_projection(text.pooler_output).float(), dim=-1)
        pixels = preprocess(images.to(device=device, dtype=dtype), self.image_size, self.mean, self.std)
        vision = self.model.vision_model(pixel_values=pixels)
        image_embedding = F.normalize(self.model.visual_projection(vision.pooler_output).float(), dim=-1)
        similarity = (image_embedding * text_embedding).sum(dim=-1)
        if self.use_logit_scale:
            similarity = self.model.logit_scale.float().exp() * similarity
        return similarity.to(images.device)


@register_reward("pickscore")
def pickscore(path: Optional[PathLike] = None, **kwargs) -> ClipSimilarity:
    """PickScore (Kirstain et al. 2023): exp(logit_scale) * cos, about 20 for typical images."""
    path = Path(path) if path is not None else weights_dir() / "PickScore_v1"
    how = ("Download the Hugging Face repo yuvalkirstain/PickScore_v1 (config.json, model.safetensors) into that "
           "folder and add the tokenizer files (vocab.json, merges.txt, tokenizer_config.json, "
           "special_tokens_map.json) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, or pass path=<folder>.")
    return ClipSimilarity(path, use_logit_scale=True, what="PickScore reward", how=how, **kwargs)


@register_reward("hpsv2")
def hpsv2(path: Optional[PathLike] = None, **kwargs) -> ClipSimilarity:
    """HPSv2 (Wu et al. 2023): cos(image, text) of its fine-tuned ViT-H/14, about 0.25-0.3."""
    path = Path(path) if path is not None else weights_dir() / "HPSv2"
    how = ("HPSv2 ships as an open_clip checkpoint (HPS_v2.1_compressed.pt in the Hub repo xswu/HPSv2); convert it to "
           "a transformers CLIPModel folder (config.json with the ViT-H/14 CLIPConfig, model.safetensors; conversion "
           "not included in rlr_fast), add the tokenizer files (vocab.json, merges.txt) of "
           "laion/CLIP-ViT-H-14-laion2B-s32B-b79K, put it there or pass path=<folder>.")
    return ClipSimilarity(path, use_logit_scale=False, what="HPSv2 reward", how=how, **kwargs)


@register_reward("imagereward")
class ImageReward(Reward):
    """ImageReward (Xu et al. 2023): BLIP's text encoder reads the prompt while cross-attending to the
    image tokens; the MLP head scores its [CLS] feature, standardised by ImageReward's mean/std."""

    differentiable = True
    WHAT = "ImageReward reward"

    def __init__(self, blip_path: Optional[PathLike] = None, head_path: Optional[PathLike] = None, *,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        from transformers import BertTokenizer, BlipForImageTextRetrieval

        blip_path = Path(blip_path) if blip_path is not None else weights_dir() / "ImageReward"
        head_path = Path(head_path) if head_path is not None else weights_dir() / "ImageReward.pt"
        how = ("It must hold ImageReward's BLIP (ImageReward.pt from the Hub repo THUDM/ImageReward) converted to a "
               "transformers BlipForImageTextRetrieval (config.json with vision_config.image_size 224, "
               "model.safetensors; conversion not included in rlr_fast) plus the bert-base-uncased tokenizer files "
               "(vocab.txt, tokenizer_config.json), or pass blip_path=<folder>.")
        _require_model_folder(blip_path, self.WHAT, how)
        _require_tokenizer(blip_path, (("vocab.txt",),), self.WHAT, how)
        blip = _load_pretrained(BlipForImageTextRetrieval, blip_path, "blip", ("vision_model.", "text_encoder."), dtype,
                                self.WHAT, how)
        # Only the vision tower and the cross-attending text encoder score; the ITM head and projections go.
        self.vision = blip.vision_model
        self.text_encoder = blip.text_encoder
        self.tokenizer = BertTokenizer.from_pretrained(blip_path, local_files_only=True)
        self.max_tokens = min(IMAGEREWARD_MAX_TOKENS, blip.config.text_config.max_position_embeddings)
        self.head = load_head(head_path, blip.config.text_config.hidden_size, self.WHAT, (
            "Download ImageReward.pt from the Hub repo THUDM/ImageReward and put it there (its mlp.* tensors are "
            "read), or pass head_path=<file>."))
        self.image_size = blip.config.vision_config.image_size
        self.mean, self.std = _image_stats(blip_path)
        _freeze(self)
        self.to(device)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device, dtype = _device_of(self.vision)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt").to(device)
        pixels = preprocess(images.to(device=device, dtype=dtype), self.image_size, self.mean, self.std)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=device)
        text = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                 encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask)
        raw = self.head(text.last_hidden_state[:, 0].float())
        return ((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).to(images.device)
