"""ImageReward (Xu et al. 2023) from the folder `rlr-fast convert imagereward` writes.

  imagereward  path: the converted folder (default weights/ImageReward): a transformers
                 BlipForImageTextRetrieval (config.json, model.safetensors) with ImageReward's BLIP
                 weights, its MLP head (head.safetensors), the bert-base-uncased tokenizer
                 (tokenizer.json or vocab.txt) and preprocessor_config.json. Made from
                 ImageReward.pt and med_config.json (Hub repo THUDM/ImageReward).
               head_path: another head file (default <path>/head.safetensors); ImageReward.pt
                 itself works too (its mlp.* tensors are read with torch.load(weights_only=True)).
               score = (MLP(text_encoder(prompt, cross-attending to the image)[CLS]) - mean) / std

The image is preprocessed as ImageReward's own transform does (torchvision Resize(224, bicubic),
CenterCrop(224), CLIP mean/std), in torch so that gradients reach the pixels. `dtype` and
`checkpoint_vision` as for the CLIP rewards (`clip_models.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .base import Reward, register_reward
from .clip_models import image_stats, load_head, tower_pixels
from .loading import (PathLike, checkpoint_layers, freeze, load_pretrained, pass_paths, require_model_folder,
                      require_tokenizer, reward_dtype, weights_dir)

# ImageReward standardises its raw head output with these statistics (from its reference code).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35
HEAD_FILE = "head.safetensors"


@register_reward("imagereward")
class ImageReward(Reward):
    """BLIP's text encoder reads the prompt while cross-attending to the image tokens; the MLP head
    scores its [CLS] feature, standardised by ImageReward's mean/std."""

    differentiable = True
    WHAT = "ImageReward reward"

    def __init__(self, path: Optional[PathLike] = None, head_path: Optional[PathLike] = None, *,
                 dtype: Union[str, torch.dtype] = torch.float32, checkpoint_vision: bool = False,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        from transformers import BertTokenizer, BlipForImageTextRetrieval

        path = Path(path) if path is not None else weights_dir() / "ImageReward"
        head_path = Path(head_path) if head_path is not None else path / HEAD_FILE
        how = ("Make it from ImageReward.pt and med_config.json (Hub repo THUDM/ImageReward) and a bert-base-uncased "
               "tokenizer folder: rlr-fast convert imagereward --checkpoint ImageReward.pt --tokenizer bert-base-uncased "
               f"--out {path}. " + pass_paths("imagereward", path="folder"))
        require_model_folder(path, self.WHAT, how)
        require_tokenizer(path, (("tokenizer.json",), ("vocab.txt",)), self.WHAT, how)
        blip = load_pretrained(BlipForImageTextRetrieval, path, "blip", ("vision_model.", "text_encoder."),
                               reward_dtype(dtype), self.WHAT, how)
        # Only the vision tower and the cross-attending text encoder score; the ITM head and projections go.
        self.vision = blip.vision_model
        self.text_encoder = blip.text_encoder
        self.tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
        self.max_tokens = min(IMAGEREWARD_MAX_TOKENS, blip.config.text_config.max_position_embeddings)
        self.head = load_head(head_path, blip.config.text_config.hidden_size, self.WHAT, how if head_path.parent == path
                              else pass_paths("imagereward", path="folder", head_path="file"))
        self.image_size = blip.config.vision_config.image_size
        self.mean, self.std = image_stats(path)
        if checkpoint_vision:
            checkpoint_layers(self.vision.encoder.layers)
        freeze(self)
        self.to(device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """BLIP's pooled image feature (B, hidden): the layer-normed [CLS] token of the vision tower."""
        pixels = tower_pixels(images, self.vision, self.image_size, self.mean, self.std, crop_rounding="round")
        return self.vision(pixel_values=pixels).pooler_output.float()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = tower_pixels(images, self.vision, self.image_size, self.mean, self.std, crop_rounding="round")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt").to(pixels.device)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=pixels.device)
        text = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                 encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask)
        raw = self.head(text.last_hidden_state[:, 0])
        return ((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).to(images.device)
