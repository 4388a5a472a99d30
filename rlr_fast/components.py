"""What every model family's loader shares: the local diffusers folder (its checks, its pipeline
class, its DDIM scheduler), the Stable Diffusion components as one `SDModels`, an offline tokenizer,
and the latent size of a resolution.

A module of its own so that the family loaders (rlr_fast.models for SD1.x, rlr_fast.sdxl,
rlr_fast.flow) build on it while rlr_fast.models dispatches a folder to them: no import circle.
Every load passes `local_files_only=True`; nothing here reaches the network.
"""

import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# diffusers' pipelines import transformers' CLIPImageProcessor, which without torchvision falls back to its
# PIL twin and warns on every command; rlr_fast never uses an image processor (the rewards preprocess in
# torch: rewards/clip_models.py), so that warning alone is dropped, before the import that raises it.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from .lora import has_lora  # noqa: E402

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# The pipelines of flow-matching transformer folders (rlr_fast.flow loads them).
FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
# The weight file names (without extension) diffusers and transformers save each model component as.
_WEIGHTS_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                 "text_encoder_2": "model"}


@dataclass
class SDModels:
    """The Stable Diffusion components we use; a field is None when it was not requested.

    `path` is the folder the components came from (None for `tiny_sd`).
    """

    unet: UNet2DConditionModel | None = None
    vae: AutoencoderKL | None = None
    text_encoder: CLIPTextModel | None = None
    tokenizer: CLIPTokenizer | None = None
    scheduler: DDIMScheduler | None = None
    path: Path | None = None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings (B, L, D) as SD conditions on them: padded to the tokenizer's max
        length (77 for CLIP), last hidden state of the text encoder."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("encode_prompts needs both the tokenizer and the text_encoder; load them with "
                             "load_sd(..., components=(..., 'text_encoder', 'tokenizer'))")
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def set_resolution(self, resolution) -> tuple[int, int]:
        """The latent (height, width) of images of `resolution` pixels (`latent_size`: an error for a
        size the model cannot make); the size later prompts are encoded for where the family conditions
        on it (SDXL's time ids)."""
        return self.latent_hw(resolution)

    def latent_hw(self, resolution) -> tuple[int, int]:
        """The latent (height, width) of images of `resolution` pixels (`latent_size`), nothing set."""
        return latent_size(resolution, self.unet.config, self.vae.config)

    def free_text_encoders(self) -> None:
        """Drop the text encoder(s) once every prompt is encoded."""
        self.text_encoder = None

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a diffusers Stable Diffusion folder (safetensors) that both `load_sd` and stock
        `StableDiffusionPipeline.from_pretrained` read. The UNet must not carry a LoRA adapter: the
        adapter's wrapped layers would be saved as base weights; save it with `save_lora` instead."""
        missing = [name for name in COMPONENTS if getattr(self, name) is None]
        if missing:
            raise ValueError(f"save_pretrained needs all of {COMPONENTS}; missing: {missing}")
        if has_lora(self.unet):
            raise ValueError("the UNet has a LoRA adapter; save the base pipeline before add_lora and the "
                             "adapter with save_lora")
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(directory, safe_serialization=True)
        return Path(directory)


def check_components(components: tuple[str, ...] | list[str], allowed: tuple[str, ...]) -> None:
    unknown = [c for c in components if c not in allowed]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {allowed}")


def check_sd_folder(path: Path, components: tuple[str, ...] = COMPONENTS,
                    allowed: tuple[str, ...] = COMPONENTS) -> None:
    """Refuse a path that is not a diffusers Stable Diffusion folder with these components (of
    `allowed`), naming what is missing (cheap: reads no weights)."""
    check_components(components, allowed)
    if not path.exists():
        raise FileNotFoundError(f"Stable Diffusion folder {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"{path} is not a diffusers Stable Diffusion folder: it has no model_index.json. Expected the layout "
            f"StableDiffusionPipeline.save_pretrained writes: model_index.json and the subfolders {list(COMPONENTS)}"
        )
    for name in components:
        if not (path / name).is_dir():
            raise FileNotFoundError(f"component {name!r} is missing: no folder {path / name}")


def pipeline_class(path: Path) -> str | None:
    """The diffusers pipeline class a folder's model_index.json names (None without a readable one)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        return None


def load_ddim_scheduler(path: Path) -> DDIMScheduler:
    """The folder's scheduler config as a DDIMScheduler that samples as Stable Diffusion does.

    A config without `clip_sample` (diffusers writes PNDMScheduler configs, SD1.4's, and
    EulerDiscreteScheduler configs, SDXL's, without it) would become DDIM's default clip_sample=True,
    which SD does not use; it becomes False, said once. A config that sets clip_sample or thresholding
    is refused, naming the file and key.
    """
    file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    overrides = {}
    if "clip_sample" not in config:
        overrides["clip_sample"] = False
        print(f"note: {file} has no clip_sample key ({config.get('_class_name', 'scheduler')} config); sampling "
              "with DDIM and clip_sample=False, as Stable Diffusion does", file=sys.stderr)
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True, **overrides)
    for key in ("clip_sample", "thresholding"):
        if scheduler.config[key]:
            raise ValueError(f"{file} sets {key}: true, which Stable Diffusion does not use and the likelihood "
                             f"ratios cannot (a nonlinear step); set \"{key}\": false in that file")
    return scheduler


def check_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")


def safetensors_kwargs(path: Path, name: str) -> dict:
    """`use_safetensors=True` where component `name` of the folder has safetensors weights, so that no
    pickle loading path is even tried."""
    stem = path / name / _WEIGHTS_STEM[name]
    has = any(Path(f"{stem}{ext}").is_file() for ext in (".safetensors", ".safetensors.index.json"))
    return {"use_safetensors": True} if has else {}


def component_loaders(path: Path, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """A loader per Stable Diffusion component of the folder; every one passes `local_files_only=True`."""
    return {
        "unet": lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype,
                                                             local_files_only=True, **safetensors_kwargs(path, "unet")),
        "vae": lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, local_files_only=True,
                                                     **safetensors_kwargs(path, "vae")),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype, local_files_only=True,
                                                              **safetensors_kwargs(path, "text_encoder")),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
        "scheduler": lambda: load_ddim_scheduler(path),
    }


def load_components(path: Path, loaders: dict, components, device) -> dict:
    """Run the loaders of `components`, naming the folder of one that fails; modules frozen, in eval mode."""
    loaded = {}
    for name in components:
        try:
            obj = loaders[name]()
        except Exception as e:  # name the folder: the library message alone rarely says which one
            raise ValueError(f"could not load component {name!r} from {path / name}: {type(e).__name__}: {e}") from e
        if isinstance(obj, nn.Module):
            obj = obj.to(device).eval().requires_grad_(False)
        loaded[name] = obj
    return loaded


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: each of the 256 bytes mapped to one printable character.

    Printable bytes map to themselves; the rest are shifted past 255 so that no token contains
    whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


def write_byte_tokenizer(folder: Path) -> int:
    """Write a CLIP tokenizer's files (vocab.json, merges.txt, tokenizer_config.json) over the bare
    byte alphabet.

    Every byte is a token (also with the `</w>` word-end suffix), no merges: any prompt
    tokenizes, offline. The config sets CLIP's 77-token context, so padding to the tokenizer's
    max length works (without it transformers reads ~1e30). Returns the vocabulary size (514).
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}), encoding="utf-8")
    return len(tokens)


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over the bare byte alphabet (`write_byte_tokenizer`), built offline.

    Loaded with `from_pretrained` on files we write because that is the constructor path that
    behaves the same across transformers versions.
    """
    with tempfile.TemporaryDirectory(prefix="rlr_tiny_tokenizer_") as tmp:
        write_byte_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def latent_size(resolution, unet_config, vae_config) -> tuple[int, int]:
    """Latent (height, width) of images of `resolution` pixels: an int (square), (height, width), or
    None for the model's native size (the UNet's sample_size).

    Height and width must be multiples of the VAE's downsampling times the UNet's (64 for SD1.x),
    so that every UNet level has a whole number of latent pixels.
    """
    def get(config, key):
        return config[key] if isinstance(config, dict) else getattr(config, key)

    vae_scale = 2 ** (len(get(vae_config, "block_out_channels")) - 1)
    unet_scale = 2 ** (len(get(unet_config, "block_out_channels")) - 1)
    native = get(unet_config, "sample_size")
    if resolution is None:
        return (native, native) if isinstance(native, int) else tuple(native)
    hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    multiple = vae_scale * unet_scale
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple for v in hw):
        native_px = native * vae_scale if isinstance(native, int) else native
        raise ValueError(f"resolution={resolution!r}: height and width must be positive multiples of {multiple} "
                         f"pixels for this model (its VAE downsamples {vae_scale}x, its UNet {unet_scale}x more); "
                         f"its native size is {native_px}")
    return (hw[0] // vae_scale, hw[1] // vae_scale)
