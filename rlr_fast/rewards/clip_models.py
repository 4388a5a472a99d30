"""CLIP-based preference rewards (aesthetic, PickScore, HPSv2) from LOCAL files, their differentiable
preprocessing, and the MLP head they share with ImageReward (`imagereward.py`).

Every reward here preprocesses in torch, so gradients reach the images: shortest side to the
model's input size (bicubic, antialiased), centre crop, normalise with the folder's
`preprocessor_config.json` mean/std (else OpenAI CLIP's), as CLIPImageProcessor does, up to
resampling details (tests/test_rewards.py bounds the difference).

Expected files (relative paths resolve from the working directory; the default folder is
$RLR_FAST_WEIGHTS, else ./weights):

  aesthetic    LAION improved aesthetic predictor on CLIP ViT-L/14.
               clip_path: transformers CLIP folder of openai/clip-vit-large-patch14
                 (default weights/clip-vit-large-patch14).
               head_path: sac+logos+ava1-l14-linearMSE.pth from
                 github.com/christophschuhmann/improved-aesthetic-predictor, or a .safetensors of the
                 same tensors (default weights/sac+logos+ava1-l14-linearMSE.pth).
               score = MLP(image_embedding / |image_embedding|)
  pickscore    path: yuvalkirstain/PickScore_v1 (transformers CLIPModel, ViT-H/14) plus the tokenizer
                 files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (default weights/PickScore_v1).
               score = logit_scale.exp() * cos(image_embedding, text_embedding)  (about 20)
  hpsv2        path: the folder `rlr-fast convert hpsv2` writes from HPSv2's open_clip checkpoint
                 (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt, Hub repo xswu/HPSv2) and the tokenizer
                 of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (default weights/HPSv2).
               score = cos(image_embedding, text_embedding)  (about 0.25-0.3, as HPSv2 reports)

Options of every learned reward: `dtype` (float32, float16 or bfloat16, or the torch dtype) is
the precision of the frozen network; `checkpoint_vision=True` recomputes each vision layer's
activations in the backward instead of keeping them (less memory for dR/dx, one more forward).
Reward networks are frozen (requires_grad False, eval mode); move them with `.to(device)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward, register_reward
from .loading import (PathLike, checkpoint_layers, device_of, freeze, load_pretrained, pass_paths,
                      require_model_folder, require_tokenizer, reward_dtype, torch_load_reason, weights_dir)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
               crop_rounding: str = "floor") -> torch.Tensor:
    """Differentiable eval preprocessing: shortest side to `size` (bicubic, antialiased), centre crop, normalise.

    The longer side becomes int(size * long / short), as in CLIPImageProcessor and torchvision's
    Resize. The crop starts at (resized - size) // 2 (`crop_rounding="floor"`, CLIPImageProcessor)
    or at round((resized - size) / 2) (`"round"`, torchvision's CenterCrop); they differ by one
    pixel when the excess is odd.
    """
    if crop_rounding not in ("floor", "round"):
        raise ValueError(f"crop_rounding must be 'floor' or 'round', got {crop_rounding!r}")
    height, width = images.shape[-2:]
    short, long = sorted((height, width))
    resized_long = int(size * long / short)
    resized_hw = (size, resized_long) if height <= width else (resized_long, size)
    if resized_hw != (height, width):
        images = F.interpolate(images, size=resized_hw, mode="bicubic", antialias=True, align_corners=False)

    def offset(excess: int) -> int:
        return excess // 2 if crop_rounding == "floor" else int(round(excess / 2))

    top, left = offset(resized_hw[0] - size), offset(resized_hw[1] - size)
    images = images[:, :, top:top + size, left:left + size]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean_t) / std_t


def image_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the folder's preprocessor_config.json, else OpenAI CLIP's."""
    config_file = folder / "preprocessor_config.json"
    if not config_file.is_file():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    config = json.loads(config_file.read_text())
    return tuple(config.get("image_mean", OPENAI_CLIP_MEAN)), tuple(config.get("image_std", OPENAI_CLIP_STD))


def tower_pixels(images: torch.Tensor, tower: nn.Module, size: int, mean, std, crop_rounding: str = "floor"):
    """`images` preprocessed for `tower`: resampled in at least float32, then cast to the tower's dtype."""
    device, dtype = device_of(tower)
    images = images.to(device=device, dtype=torch.promote_types(images.dtype, torch.float32))
    return preprocess(images, size, mean, std, crop_rounding=crop_rounding).to(dtype)


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
        return self.layers(features.to(self.layers[0].weight.dtype)).float().squeeze(-1)


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
                             f"torch.load(weights_only=True): {torch_load_reason(e)}") from e
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


@register_reward("aesthetic")
class LaionAesthetic(Reward):
    """LAION improved aesthetic predictor: CLIP image embedding, L2-normalised, through the MLP head.

    The head's input size follows the CLIP projection size (768 for ViT-L/14), so any CLIP works.
    """

    differentiable = True
    WHAT = "LAION aesthetic reward"

    def __init__(self, clip_path: Optional[PathLike] = None, head_path: Optional[PathLike] = None, *,
                 dtype: Union[str, torch.dtype] = torch.float32, checkpoint_vision: bool = False,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        from transformers import CLIPModel

        clip_path = Path(clip_path) if clip_path is not None else weights_dir() / "clip-vit-large-patch14"
        head_path = Path(head_path) if head_path is not None else weights_dir() / "sac+logos+ava1-l14-linearMSE.pth"
        how = ("Download the Hugging Face repo openai/clip-vit-large-patch14 (config.json, model.safetensors, "
               "preprocessor_config.json) into that folder. " + pass_paths("aesthetic", clip_path="folder"))
        require_model_folder(clip_path, self.WHAT, how)
        clip = load_pretrained(CLIPModel, clip_path, "clip", ("vision_model.", "visual_projection."),
                               reward_dtype(dtype), self.WHAT, how)
        # Only the image side scores; the text tower is dropped with `clip`.
        self.vision = clip.vision_model
        self.projection = clip.visual_projection
        self.head = load_head(head_path, clip.config.projection_dim, self.WHAT, (
            "Download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor "
            "and put it there. " + pass_paths("aesthetic", clip_path="folder", head_path="file")))
        self.image_size = clip.config.vision_config.image_size
        self.mean, self.std = image_stats(clip_path)
        if checkpoint_vision:
            checkpoint_layers(self.vision.encoder.layers)
        freeze(self)
        self.to(device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding (B, projection_dim) the head scores, before normalisation."""
        pixels = tower_pixels(images, self.vision, self.image_size, self.mean, self.std)
        return self.projection(self.vision(pixel_values=pixels).pooler_output).float()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(F.normalize(self.features(images), dim=-1)).to(images.device)


class ClipSimilarity(Reward):
    """`scale * cos(image_embedding, text_embedding)` of a transformers CLIPModel (PickScore, HPSv2).

    Subclasses set `use_logit_scale` (scale by the learned temperature exp(logit_scale), or by 1),
    `default_folder` (under the weights directory) and `how_to_get(folder)`. Prompts are tokenised to
    the text tower's length and encoded without gradients.
    """

    differentiable = True
    WHAT = "CLIP similarity reward"
    use_logit_scale = False
    default_folder = ""

    @staticmethod
    def how_to_get(folder: Path) -> str:
        raise NotImplementedError

    def __init__(self, path: Optional[PathLike] = None, *, dtype: Union[str, torch.dtype] = torch.float32,
                 checkpoint_vision: bool = False, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(path) if path is not None else weights_dir() / self.default_folder
        how = self.how_to_get(path)
        require_model_folder(path, self.WHAT, how)
        require_tokenizer(path, CLIP_TOKENIZER_FILES, self.WHAT, how)
        self.model = load_pretrained(CLIPModel, path, "clip", ("",), reward_dtype(dtype), self.WHAT, how)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.max_tokens = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.image_size = self.model.config.vision_config.image_size
        self.mean, self.std = image_stats(path)
        if checkpoint_vision:
            checkpoint_layers(self.model.vision_model.encoder.layers)
        freeze(self)
        self.to(device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding (B, projection_dim) compared with the text's, before normalisation."""
        pixels = tower_pixels(images, self.model.vision_model, self.image_size, self.mean, self.std)
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output).float()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device, _ = device_of(self.model)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt").to(device)
        with torch.no_grad():
            text = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            text_embedding = F.normalize(self.model.text_projection(text.pooler_output).float(), dim=-1)
        image_embedding = F.normalize(self.features(images), dim=-1)
        similarity = (image_embedding * text_embedding).sum(dim=-1)
        if self.use_logit_scale:
            similarity = self.model.logit_scale.float().exp() * similarity
        return similarity.to(images.device)


@register_reward("pickscore")
class PickScore(ClipSimilarity):
    """PickScore (Kirstain et al. 2023): exp(logit_scale) * cos, about 20 for typical images."""

    WHAT = "PickScore reward"
    use_logit_scale = True
    default_folder = "PickScore_v1"

    @staticmethod
    def how_to_get(folder: Path) -> str:
        return ("Download the Hugging Face repo yuvalkirstain/PickScore_v1 (config.json, model.safetensors) into that "
                "folder and add the tokenizer files (vocab.json, merges.txt, tokenizer_config.json, "
                "special_tokens_map.json) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K. "
                + pass_paths("pickscore", path="folder"))


@register_reward("hpsv2")
class HPSv2(ClipSimilarity):
    """HPSv2 (Wu et al. 2023): cos(image, text) of its fine-tuned ViT-H/14, about 0.25-0.3."""

    WHAT = "HPSv2 reward"
    use_logit_scale = False
    default_folder = "HPSv2"

    @staticmethod
    def how_to_get(folder: Path) -> str:
        return ("Make it from HPSv2's open_clip checkpoint (HPS_v2.1_compressed.pt or HPS_v2_compressed.pt, Hub repo "
                "xswu/HPSv2) and the tokenizer folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K: rlr-fast convert "
                f"hpsv2 --checkpoint HPS_v2.1_compressed.pt --tokenizer CLIP-ViT-H-14-laion2B-s32B-b79K --out {folder}. "
                + pass_paths("hpsv2", path="folder"))
