"""Every setting of a fine-tuning run in one dataclass, named presets, and YAML / `--set` parsing.

    cfg = Config.from_preset("demo", lr=1e-3)           # a preset plus overrides
    cfg = load_config(path="my.yaml", sets=["lr=1e-3"])  # what `rlr-fast finetune` does

Each field carries its documentation in `metadata["doc"]`: `rlr-fast finetune --help` prints it,
so the help never drifts from the code. Values from YAML or `--set key=value` are parsed by the
field's type annotation; a bad key or value raises a ValueError/TypeError naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from .demo_data import PROMPTS as DEMO_PROMPTS
from .estimators import METHODS

BASELINES = ("none", "loo", "loo_prompt")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")

# Common animal names, for prompts "a photo of a <animal>" in the style of DDPO's and the RLR
# paper's aesthetic experiments (our own list).
ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow",
    "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly",
    "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "owl", "snake", "turtle", "frog",
    "chicken", "duck", "goose", "bee", "pig", "camel", "llama", "gorilla", "hedgehog", "kangaroo",
]
PROMPT_SETS: dict[str, list[str]] = {
    "demo": list(DEMO_PROMPTS),
    "animals": [f"a photo of a {animal}" for animal in ANIMALS],
}


def option(default: Any, doc: str):
    """A dataclass field with its documentation attached (read by `config_help`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class Config:
    """One fine-tuning run. Defaults are neutral; the presets below set the runs we ship."""

    # --- run
    preset: str = option("demo", "the preset these values started from (informational; choose a preset "
                                 "with --preset or a YAML `preset:` key)")
    model: str = option("default", "'default' (the embedded tiny text-to-image model) or the path of a "
                                   "local diffusers Stable Diffusion folder")
    device: str = option("auto", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = option("float32", "dtype of the frozen weights and of autocast: float32, or float16/"
                                   "bfloat16 on a GPU (LoRA weights and optimizer state stay float32)")
    seed: int = option(0, "seeds LoRA init, prompts, initial noise, sampling noise and the estimator")
    out_dir: str = option("out/run", "directory for metrics, samples, checkpoints and the final LoRA")
    overwrite: bool = option(False, "start afresh in an out_dir that already holds a run")
    resume: Optional[str] = option(None, "continue the run in this out_dir (or from this checkpoint file)")

    # --- sampling
    prompts: str = option("demo", f"built-in prompt set ({', '.join(PROMPT_SETS)}) or a text file, one "
                                  "prompt per line ('#' starts a comment)")
    num_steps: int = option(20, "DDIM sampling steps T")
    eta: float = option(1.0, "DDIM eta: 0 deterministic, 1 DDPM-like noise (likelihood ratios need > 0)")
    guidance_scale: float = option(1.0, "classifier-free guidance scale (1 = no guidance)")
    negative_prompt: str = option("", "the prompt of the unconditional pass of guidance")
    batch_size: int = option(4, "samples per micro-batch")
    images_per_prompt: int = option(2, "samples of each prompt in a micro-batch (per-prompt baselines "
                                       "need >= 2); divides batch_size")

    # --- reward
    reward: Union[str, Callable] = option("color_match", "reward name (see rlr_fast.rewards."
                                                         "available_rewards()) or, from Python, a "
                                                         "callable reward(images, prompts) -> (B,)")
    reward_kwargs: dict = option({}, "keyword arguments of the reward loader, e.g. local weight paths")

    # --- estimator (rlr_math.md)
    method: str = option("rlr", f"gradient estimator: {', '.join(METHODS)}")
    first_order_steps: int = option(1, "rlr: f, the last steps estimated pathwise from dR/dx0")
    h: int = option(2, "rlr: length of the half-order sub-chain")
    j: Union[int, str] = option("uniform", "rlr: start j of the sub-chain, an int or 'uniform'")
    zo_steps: Optional[int] = option(None, "rlr/zo: likelihood-ratio steps subsampled per update (None: all)")
    baseline: Union[float, str] = option("loo_prompt", "reward baseline: none, loo (batch leave-one-out), "
                                                       "loo_prompt (per prompt) or a number")
    normalize: Union[bool, float] = option(False, "divide the estimate by the batch reward std (true; "
                                                  "slightly biased) or by a given scale")
    truncated_bp_k: Union[int, str] = option(1, "truncated_bp: steps back-propagated, or 'random'")
    clip_range: float = option(1e-4, "ddpo: PPO clip range of the importance ratio")

    # --- LoRA and optimizer
    lora_rank: int = option(4, "LoRA rank on the UNet attention projections")
    lora_alpha: float = option(4.0, "LoRA alpha (scale alpha / rank)")
    lr: float = option(1e-3, "AdamW learning rate")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    grad_accum: int = option(1, "micro-batches averaged per optimizer step")
    max_grad_norm: Optional[float] = option(1.0, "clip the gradient to this global norm (None: no clip)")
    warmup_steps: int = option(0, "linear learning-rate warm-up over this many optimizer steps")
    train_steps: int = option(100, "optimizer steps of the run")

    # --- logging and checkpoints
    sample_every: int = option(0, "write a sample grid every N steps (0: only before and after training)")
    sample_prompts: int = option(4, "prompts (the first of the set) in each sample grid")
    sample_seeds: tuple[int, ...] = option((0, 1, 2, 3), "seeds of the sample grid's columns")
    checkpoint_every: int = option(0, "write a checkpoint every N steps (0: only at the end or on Ctrl-C)")
    max_nonfinite: int = option(3, "stop after this many updates in a row skipped for a NaN/Inf "
                                   "reward or gradient")
    profile: bool = option(False, "NVTX ranges around rollout, reward, estimate and optimizer step")
    tensorboard: bool = option(True, "also log to TensorBoard (when the tensorboard package is installed)")

    # --- memory
    max_memory_gb: Optional[float] = option(None, "let rlr_fast.plan choose the memory options below so that one "
                                                  "update's estimated peak fits this many GiB (overrides them)")
    max_batch: Optional[int] = option(None, "samples per UNet call in likelihood-ratio chunks (None: all)")
    checkpoint_unet: bool = option(False, "gradient checkpointing inside each recomputed UNet step")
    checkpoint_vae: bool = option(True, "gradient checkpointing of the VAE decode in the reward")
    decode_chunk: int = option(1, "samples decoded by the VAE at a time in the reward")
    split_cfg: bool = option(False, "guidance: run unconditional and conditional passes as two calls")
    free_text_encoder: bool = option(False, "delete the text encoder after encoding the prompts")

    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str = "demo", **overrides) -> "Config":
        """The named preset, with `overrides` applied (parsed and validated)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls().with_overrides({"preset": name, **PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A Config from a mapping such as `to_dict()` wrote (unknown keys are an error)."""
        return cls().with_overrides(values, validate=False).validate()

    def with_overrides(self, overrides: dict, *, validate: bool = True) -> "Config":
        """A copy with `overrides` applied; each value is parsed by the field's type."""
        types_ = field_types()
        changes = {}
        for key, value in overrides.items():
            if key not in types_:
                raise ValueError(unknown_key_message(key))
            changes[key] = coerce(key, value, types_[key])
        new = dataclasses.replace(self, **changes)
        return new.validate() if validate else new

    def to_dict(self) -> dict:
        """Plain values (tuples as lists, a callable reward as its name), YAML/JSON-ready."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if callable(value):
                value = f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}>"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "Config":
        """Raise ValueError/TypeError naming the first bad value; returns self."""
        for key, tp in field_types().items():  # a Config built directly bypasses with_overrides
            coerce(key, getattr(self, key), tp)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        _check_choice("method", self.method, METHODS)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.device not in DEVICES and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {self.device!r}")
        if isinstance(self.baseline, str):
            _check_choice("baseline", self.baseline, BASELINES)
        if isinstance(self.j, str):
            _check_choice("j", self.j, ("uniform",))
        if isinstance(self.truncated_bp_k, str):
            _check_choice("truncated_bp_k", self.truncated_bp_k, ("random",))
        if not self.model:
            raise ValueError("model must be 'default' or the path of a diffusers Stable Diffusion folder, got ''")
        if not self.prompts:
            raise ValueError(f"prompts must name a built-in set ({', '.join(PROMPT_SETS)}) or a file, got ''")

        _check_min("num_steps", self.num_steps, 1)
        _check_min("batch_size", self.batch_size, 1)
        _check_min("images_per_prompt", self.images_per_prompt, 1)
        _check_min("first_order_steps", self.first_order_steps, 0)
        _check_min("h", self.h, 1)
        _check_min("lora_rank", self.lora_rank, 1)
        _check_min("grad_accum", self.grad_accum, 1)
        _check_min("warmup_steps", self.warmup_steps, 0)
        _check_min("train_steps", self.train_steps, 1)
        _check_min("sample_every", self.sample_every, 0)
        _check_min("sample_prompts", self.sample_prompts, 0)
        _check_min("checkpoint_every", self.checkpoint_every, 0)
        _check_min("max_nonfinite", self.max_nonfinite, 1)
        _check_min("decode_chunk", self.decode_chunk, 1)
        if self.max_batch is not None:
            _check_min("max_batch", self.max_batch, 1)
        for name in ("lr", "lora_alpha", "adam_eps", "clip_range"):
            _check_positive(name, getattr(self, name))
        for name in ("max_grad_norm", "max_memory_gb"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas}")
        if not isinstance(self.normalize, bool) and not self.normalize > 0:
            raise ValueError(f"normalize must be true/false or a positive scale, got {self.normalize}")

        if self.batch_size % self.images_per_prompt:
            raise ValueError(f"images_per_prompt={self.images_per_prompt} must divide batch_size={self.batch_size}")
        if self.baseline == "loo_prompt" and self.images_per_prompt < 2:
            raise ValueError("baseline='loo_prompt' needs images_per_prompt >= 2 (a leave-one-out mean over "
                             f"the other samples of the same prompt), got images_per_prompt={self.images_per_prompt}")
        if self.baseline == "loo" and self.batch_size < 2:
            raise ValueError(f"baseline='loo' needs batch_size >= 2, got {self.batch_size}")
        self._check_steps()
        return self

    def _check_steps(self) -> None:
        """The estimator's step counts must fit in T = num_steps."""
        T = self.num_steps
        if self.method == "rlr":
            f, h = self.first_order_steps, self.h
            if f + h > T:
                raise ValueError(f"h={h} is too large for num_steps={T}: rlr needs first_order_steps + h <= "
                                 f"num_steps ({f} + {h} > {T})")
            if isinstance(self.j, int) and not f <= self.j <= T - h:
                raise ValueError(f"j={self.j} is outside first_order_steps..num_steps-h = {f}..{T - h}")
            if self.zo_steps is not None and not 1 <= self.zo_steps <= max(T - f - h, 0):
                raise ValueError(f"zo_steps={self.zo_steps} must be in 1..{T - f - h} (the steps outside F "
                                 "and H), or None")
        if self.method == "zo" and self.zo_steps is not None and not 1 <= self.zo_steps <= T:
            raise ValueError(f"zo_steps={self.zo_steps} must be in 1..num_steps={T}, or None")
        if self.method == "truncated_bp" and isinstance(self.truncated_bp_k, int) \
                and not 1 <= self.truncated_bp_k <= T:
            raise ValueError(f"truncated_bp_k={self.truncated_bp_k} must be in 1..num_steps={T}")
        if self.method in ("rlr", "zo", "ddpo") and self.eta == 0 and not (
                self.method == "rlr" and self.first_order_steps == T):
            raise ValueError(f"method={self.method!r} uses likelihood ratios, which need noise: eta must be > 0, "
                             "got eta=0")


# ----------------------------------------------------------------------------------------------
# Presets

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded tiny model on the CPU: about a minute on 2 cores. The reward is `brightness`
    # (differentiable): the embedded model already follows its prompts' colours (color_match
    # near its maximum, so a colour demo has nothing left to raise), while brightness has headroom
    # and rises by ~10 standard errors in 60 steps (measured; README). A demo is disposable, so
    # running it again replaces out/demo (overwrite) instead of refusing.
    "demo": dict(
        model="default", device="cpu", dtype="float32", out_dir="out/demo", overwrite=True,
        prompts="demo", reward="brightness", num_steps=10, eta=1.0, guidance_scale=1.0,
        batch_size=8, images_per_prompt=2, method="rlr", first_order_steps=1, h=2,
        baseline="loo_prompt", lora_rank=4, lora_alpha=4.0, lr=3e-3, train_steps=60, warmup_steps=5,
        max_grad_norm=1.0, sample_every=20, checkpoint_every=20, sample_prompts=4,
    ),
    # SD1.4 on one GPU, as in the RLR paper's aesthetic experiment. From the paper / its official
    # script (github.com/RTkenny/RLR-Opimtizer, scripts/aesthetic_RLR_vb.sh): SD v1.4, the LAION
    # aesthetic reward (CLIP ViT-L/14 + MLP), T = 50 DDIM steps, classifier-free guidance during
    # training, sub-chain h = 2 (chain_len=2), lr 1e-3, 3 accumulated micro-batches of 6, seed 42,
    # one first-order step, animal prompts. From the trl AlignProp/DDPO defaults that code builds on:
    # LoRA rank 4 (alpha 4) on to_q/to_k/to_v/to_out.0, guidance 7.5 with an empty negative prompt,
    # fp16 frozen weights. Our choices: eta = 1.0 (the official script samples with eta = 0.05; our
    # likelihood-ratio terms scale as 1/sigma, so small eta makes them ~20x noisier), the
    # per-prompt leave-one-out baseline (3 prompts x 2 images), 200 steps with 10 warm-up, clipping
    # at norm 1, and the memory options of memory_budget.md (checkpointed UNet and VAE, one sample
    # decoded at a time, text encoder freed).
    "sd14": dict(
        model="stable-diffusion-v1-4", device="cuda", dtype="float16", out_dir="out/sd14", seed=42,
        prompts="animals", reward="aesthetic", num_steps=50, eta=1.0, guidance_scale=7.5,
        negative_prompt="", batch_size=6, images_per_prompt=2, method="rlr", first_order_steps=1, h=2,
        baseline="loo_prompt", lora_rank=4, lora_alpha=4.0, lr=1e-3, grad_accum=3, train_steps=200,
        warmup_steps=10, max_grad_norm=1.0, sample_every=25, checkpoint_every=25, sample_prompts=4,
        checkpoint_unet=True, checkpoint_vae=True, decode_chunk=1, free_text_encoder=True,
    ),
}


# ----------------------------------------------------------------------------------------------
# Parsing values by type


def field_types() -> dict[str, Any]:
    """Field name -> resolved type annotation, in declaration order."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def unknown_key_message(key: str) -> str:
    names = list(field_types())
    # keys sharing the first word ("lr_rate" -> "lr") beat mere spelling similarity ("lora_rank")
    same_head = [n for n in names if n.split("_")[0] == key.split("_")[0]]
    close = difflib.get_close_matches(key, same_head or names, n=1, cutoff=0.0)
    return f"unknown config key {key!r}; did you mean {close[0]!r}? (rlr-fast finetune --help lists every key)"


def type_name(tp) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        inner = f"{type_name(args[0])}, ..." if len(args) == 2 and args[1] is Ellipsis else \
            ", ".join(type_name(a) for a in args)
        return f"tuple[{inner}]"
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) is not None and typing.get_origin(tp).__name__ == "Callable":
        return "callable"
    return getattr(tp, "__name__", str(tp))


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def coerce(key: str, value: Any, tp) -> Any:
    """`value` as type `tp`: text (from --set or YAML) is parsed; other values must already fit.

    Raises TypeError naming the key, the expected type and the value.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        # bool before numbers so "true" stays a bool; numbers before str so "0.5" is a float
        order = sorted((a for a in args if a is not type(None)), key=lambda a: [bool, int, float].index(a)
                       if a in (bool, int, float) else 3)
        for arg in order:
            try:
                return coerce(key, value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{key} must be of type {type_name(tp)}, got {value!r}")
    if origin is tuple:
        return _coerce_tuple(key, value, typing.get_args(tp))
    if origin is not None and origin.__name__ == "Callable":
        if callable(value) and not isinstance(value, type):
            return value
        raise TypeError(f"{key} must be callable, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                pass
        if isinstance(value, dict):
            return dict(value)
    else:
        raise TypeError(f"{key}: unsupported field type {tp!r}")
    raise TypeError(f"{key} must be of type {type_name(tp)}, got {value!r}")


def _coerce_tuple(key: str, value: Any, args: tuple) -> tuple:
    if isinstance(value, str):  # "0.9,0.999" or "[0.9, 0.999]" or "(0, 1)"
        text = value.strip().strip("[]()")
        value = [v for v in (part.strip() for part in text.split(",")) if v] if text else []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{key} must be a list like [a, b], got {value!r}")
    variadic = len(args) == 2 and args[1] is Ellipsis
    elem_types = [args[0]] * len(value) if variadic else list(args)
    if len(value) != len(elem_types):
        raise ValueError(f"{key} must have {len(elem_types)} elements, got {len(value)}: {value!r}")
    return tuple(coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, elem_types)))


def _check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}{hint}")


def _check_min(key: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")


def _check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be > 0, got {value}")


# ----------------------------------------------------------------------------------------------
# Sources of a config: YAML files and --set


def parse_set(text: str) -> tuple[str, str]:
    """'key=value' -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects key=value, got {text!r}")
    return key.strip(), value.strip()


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def load_config(preset: Optional[str] = None, path: Optional[str | Path] = None, sets: tuple[str, ...] = (),
                base: Optional[Config] = None) -> Config:
    """The config of a run: `base` or a preset (argument, else the YAML's `preset:` key, else demo),
    then the YAML file's keys, then the `--set key=value` overrides."""
    data = read_yaml(path) if path is not None else {}
    name = preset or data.pop("preset", None)
    data.pop("preset", None)
    if base is not None and name is None:
        cfg = base
    else:
        cfg = Config.from_preset(name or "demo")
    overrides = dict(data)
    for text in sets:
        key, value = parse_set(text)
        overrides[key] = value
    return cfg.with_overrides(overrides)


def load_prompts(spec: str) -> list[str]:
    """The prompts of a built-in set name or of a text file (one per line, '#' comments)."""
    if spec in PROMPT_SETS:
        return list(PROMPT_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompts={spec!r} is neither a built-in prompt set ({', '.join(PROMPT_SETS)}) "
                                "nor an existing file")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (only blank lines or comments)")
    return prompts


def config_help() -> str:
    """Every config key with its type, its value in the demo preset and its documentation."""
    demo = Config.from_preset("demo")
    rows = []
    for f in dataclasses.fields(Config):
        tp = type_name(field_types()[f.name])
        rows.append(f"  {f.name} ({tp}, demo: {getattr(demo, f.name)!r})\n      {f.metadata['doc']}")
    return "\n".join(rows)
