"""Every setting of a fine-tuning run in one dataclass, and YAML / `--set` parsing (presets and prompt
sets: rlr_fast.presets).

    cfg = Config.from_preset("demo", lr=1e-3)           # a preset plus overrides
    cfg = load_config(path="my.yaml", sets=["lr=1e-3"])  # what `rlr-fast finetune` does

Each field carries its documentation in `metadata["doc"]`: `rlr-fast finetune --help` prints it,
so the help never drifts from the code. Values from YAML or `--set key=value` are parsed by the
field's type annotation; a bad key or value raises a ValueError/TypeError naming it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

import yaml

from .options import (EstimatorOptions, check_choice, check_min, coerce,
                      field_types as _field_types, option, type_name, unknown_key_message as _unknown_key)
from .presets import PRESETS, PROMPT_SETS
from .prompts import PromptSchedule, schedule_value

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16", "float64")
ROLLOUTS = ("auto", "cuda_graph", "eager")
LR_SCHEDULERS = ("constant", "cosine")
REPLAY_SAMPLINGS = ("uniform", "reward")
# What one command asks for rather than what a run is: left out of the config a run records.
INVOCATION_KEYS = {"overwrite": False, "resume": None}

@dataclass
class Config(EstimatorOptions):
    """One fine-tuning run. Defaults are neutral; the presets below set the runs we ship.

    The estimator's keys (method, h, baseline, max_batch, ...) are inherited from
    `rlr_fast.options.EstimatorOptions`, validated by its code, and handed to `estimate` and `plan`
    as `cfg.estimator_options()`.
    """

    accepts_auto: ClassVar[bool] = True  # method="auto": rlr_fast.design chooses the estimator

    # --- run
    preset: str = option("demo", "the preset these values started from (informational; choose a preset "
                                 "with --preset or a YAML `preset:` key)")
    model: str = option("default", "'default' (the embedded tiny text-to-image model), the path of a "
                                   "local diffusers Stable Diffusion folder, or of a text-to-video folder "
                                   "(TextToVideoSDPipeline or AnimateDiffPipeline; see rlr_fast.video)")
    motion_adapter: Optional[str] = option(None, "a local diffusers MotionAdapter folder: with a Stable Diffusion "
                                                 "1.x `model`, trains AnimateDiff (a video model)")
    num_frames: int = option(16, "frames of each video (video models only)", low=1)
    device: str = option("auto", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = option("float32", "dtype of the frozen weights and of autocast: float32, or float16/"
                                   "bfloat16 on a GPU (LoRA weights and optimizer state stay float32), or "
                                   "float64 on the CPU: weights, LoRA, optimizer state and the chain in float64 "
                                   "(exact reproducibility checks)")
    seed: int = option(0, "seeds LoRA init, prompts, initial noise, sampling noise and the estimator")
    out_dir: str = option("out/run", "directory for metrics, samples, checkpoints and the final LoRA")
    overwrite: bool = option(False, "delete the run (checkpoints, LoRA) an out_dir holds and start afresh; asked "
                                    "for on the command line (--set overwrite=true) or from Python only, never "
                                    "from a YAML file or preset (an out_dir without checkpoints is reused anyway)")
    resume: Optional[str] = option(None, "continue the run in this out_dir (or from this checkpoint file)")
    distributed_timeout: float = option(600.0, "torchrun runs: seconds a rank waits for the others at a collective "
                                               "before stopping with an error (a rank died or hangs); it must cover "
                                               "the longest work rank 0 does alone (sample grids, checkpoints)",
                                        positive=True)

    # --- sampling
    prompts: str = option("demo", f"built-in prompt set ({', '.join(PROMPT_SETS)}) or a text file, one "
                                  "prompt per line ('#' starts a comment)")
    num_steps: int = option(20, "DDIM sampling steps T", low=1)
    resolution: Optional[Union[int, tuple[int, int]]] = option(
        None, "image size in pixels: an int (square) or [height, width], multiples of 64 for SD1.x (the VAE's "
              "and the UNet's downsampling); None: the model's native size. Activation memory grows with the "
              "pixel count")
    rollout: str = option("auto", "training rollouts: 'auto' (replayed from a CUDA graph on a GPU, eager "
                                  "elsewhere or when capture fails, with the reason), 'cuda_graph' or 'eager'")
    eta: float = option(1.0, "DDIM eta: 0 deterministic, 1 DDPM-like noise; an SD3 / FLUX model's flow SDE noise "
                        "level a: 0 the Euler ODE, 0.7 Flow-GRPO's (likelihood ratios need > 0)")
    guidance_scale: float = option(1.0, "classifier-free guidance scale (1 = no guidance)")
    negative_prompt: str = option("", "the prompt of the unconditional pass of guidance")
    prompt_schedule: Optional[dict] = option(
        None, "prompts that change with the step (diffusive chain of thought): per base prompt of the set, "
              "segments {prompt, from_step, to_step} covering [0, 1], fractions of the chain (0 its first, "
              "noisiest step; step k of T takes the segment holding k/T). A mapping in YAML, or the path of "
              "a YAML file of one (recorded in the run as its contents); docs/training.md, 'Prompt schedules'")
    batch_size: int = option(4, "samples per micro-batch, over all ranks: under torchrun each of the W ranks "
                                "rolls out batch_size / W of them (W must divide it), so a config is the same run "
                                "at any world size", low=1)
    images_per_prompt: int = option(2, "samples of each prompt in a micro-batch (per-prompt baselines "
                                       "need >= 2); divides batch_size", low=1)

    # --- reward
    reward: Union[str, Callable] = option("color_match", "reward name (see rlr_fast.rewards."
                                                         "available_rewards()) or, from Python, a "
                                                         "callable reward(images, prompts) -> (B,)")
    reward_kwargs: dict = option({}, "keyword arguments of the reward loader, e.g. local weight paths")

    # --- LoRA and optimizer
    lora_rank: int = option(4, "LoRA rank on the UNet attention projections", low=1)
    lora_alpha: float = option(4.0, "LoRA alpha (scale alpha / rank)", positive=True)
    lr: float = option(1e-3, "AdamW learning rate, on the gradient of the mean reward over an optimizer step's "
                             "batch_size x grad_accum samples (at any number of ranks)", positive=True)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    adam_eps: float = option(1e-8, "AdamW epsilon", positive=True)
    grad_accum: int = option(1, "micro-batches averaged per optimizer step", low=1)
    max_grad_norm: Optional[float] = option(1.0, "clip the gradient to this global norm (None: no clip)", positive=True)
    warmup_steps: int = option(0, "linear learning-rate warm-up over this many optimizer steps (more than "
                                  "train_steps: the run ends still warming up, which it says)", low=0)
    train_steps: int = option(100, "optimizer steps of the run", low=1)
    lr_scheduler: str = option("constant", "learning rate after the warm-up: constant, or cosine (from lr down "
                                           "to 0 at train_steps)")

    # --- ddpo as it is run: several optimizer steps per sampled batch (rlr_fast.ddpo); grpo runs the same
    # epochs (ddpo_rollout_batches, ddpo_inner_epochs, ddpo_minibatches, ddpo_adv_clip), its advantages per group
    ddpo_rollout_batches: int = option(1, "ddpo: rollout batches of batch_size sampled per epoch; the epoch's "
                                          "samples are then reused for several optimizer steps", low=1)
    ddpo_inner_epochs: int = option(1, "ddpo: passes over each epoch's samples", low=1)
    ddpo_minibatches: int = option(2, "ddpo: minibatches each pass is split into (shuffled); grad_accum of "
                                      "them make one optimizer step, so every step after an epoch's first is "
                                      "off-policy and the clip range acts", low=1)
    ddpo_adv_clip: float = option(5.0, "ddpo: advantages are clipped to [-ddpo_adv_clip, ddpo_adv_clip]", positive=True)
    ddpo_buffer_size: int = option(16, "ddpo: rewards kept per prompt for its advantage statistics", low=1)
    ddpo_min_count: int = option(16, "ddpo: rewards a prompt needs in its buffer before its own statistics "
                                     "replace the epoch's", low=1)

    # --- sqdf's off-policy replay (rlr_fast.replay); the estimator's sqdf_* keys are above
    replay_capacity: int = option(0, "sqdf: chains kept in the replay buffer, oldest replaced first (0: no buffer, "
                                     "every update trains on its own fresh rollouts); at least batch_size x "
                                     "grad_accum")
    replay_ratio: int = option(1, "sqdf with a buffer: optimizer steps per fresh batch of batch_size x grad_accum "
                                  "rollouts added to the buffer")
    replay_sampling: str = option("uniform", "sqdf with a buffer: 'uniform' (distinct chains, each at a uniform "
                                             "step of sqdf_steps) or 'reward' (chain and step drawn together with "
                                             "probability ~ max(R, 0) * sqdf_gamma ** (steps after k))")

    # --- logging and checkpoints
    sample_every: int = option(0, "write a sample grid every N steps (0: only before and after training)", low=0)
    sample_prompts: int = option(4, "prompts (the first of the set) in each sample grid", low=0)
    sample_seeds: tuple[int, ...] = option((0, 1, 2, 3), "seeds of the sample grid's columns")
    checkpoint_every: int = option(0, "write a checkpoint every N steps (0: only at the end or on Ctrl-C)", low=0)
    keep_checkpoints: int = option(3, "keep the newest N checkpoints, deleting older ones (0: keep all); the newest "
                                      "one that verifies is never deleted", low=0)
    max_nonfinite: int = option(3, "stop after this many updates in a row skipped for a NaN/Inf "
                                   "reward or gradient", low=1)
    profile: bool = option(False, "NVTX ranges around rollout, reward, estimate and optimizer step")
    tensorboard: bool = option(True, "also log to TensorBoard (when the tensorboard package is installed)")

    # --- estimator design (method=auto)
    design_every: int = option(0, "method=auto: design the estimator again every N updates (0: only at the start)",
                               low=0)
    design_pilots: int = option(16, "method=auto: pilot batches per design (each costs about T (1 + 2.15 (1 + "
                                    "baselines * design_max_h)) UNet forward-equivalents, baselines the number of "
                                    "baselines compared: 2 (none, loo), 3 when a micro-batch holds images_per_prompt "
                                    ">= 2 of a prompt (loo_prompt too); fewer than about 32 can pick a design several "
                                    "times worse: docs/estimator.md §13)", low=2)
    design_max_h: int = option(4, "method=auto: the longest half-order sub-chain the design tries", low=1)
    design_budget: Optional[float] = option(None, "method=auto: the most UNet forward-equivalents one update may cost "
                                                  "(rollout T and reward included); None: no limit", positive=True)

    # --- evaluation during training (rlr_fast.evaluation; `rlr-fast evaluate` is the full one)
    eval_every: int = option(0, "evaluate the LoRA against the base model before the first step, every N steps "
                                "and after the last, into eval.jsonl and eval_curve.png: each reward's mean, "
                                "sample diversity and the KL to the base sampler (0: never)", low=0)
    eval_prompts: Optional[str] = option(None, "prompts of those evaluations (a built-in set or a file); None: the "
                                               "held-out set of `prompts` (demo_heldout, animals_heldout), or "
                                               "`prompts` itself when it is a file")
    eval_num_prompts: int = option(4, "the first N of eval_prompts, so an evaluation stays cheap", low=1)
    eval_seeds: tuple[int, ...] = option((0, 1, 2, 3), "seeds of those evaluations: each prompt is sampled once "
                                                        "per seed (diversity needs two or more)")
    eval_rewards: tuple[str, ...] = option((), "rewards scored in those evaluations besides `reward`, e.g. "
                                                "[color_match] beside brightness: prompt-following falling while "
                                                "the reward rises is reward hacking")
    eval_reward_kwargs: dict = option({}, "options of the eval_rewards' loaders, by name, e.g. "
                                          "{hpsv2: {path: /weights/HPSv2}}")

    # --- memory
    max_memory_gb: Optional[float] = option(None, "let rlr_fast.plan choose the memory options (checkpoint_vae, "
                                                  "decode_chunk, free_text_encoder, and max_batch, checkpoint_unet, "
                                                  "split_cfg) so that one update's estimated peak fits this many GiB "
                                                  "(overrides them)", positive=True)
    checkpoint_vae: bool = option(True, "gradient checkpointing of the VAE decode in the reward")
    decode_chunk: int = option(1, "samples (video frames) decoded by the VAE at a time in the reward", low=1)
    free_text_encoder: bool = option(False, "delete the text encoder after encoding the prompts")

    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str = "demo", **overrides) -> "Config":
        """The named preset, with `overrides` applied (parsed and validated; an estimator option among them
        that the method ignores is an error)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        preset = cls().with_overrides({"preset": name, **PRESETS[name]}, validate=False)
        cfg = preset.with_overrides(overrides, merge=True)
        cfg.check_used(overrides)
        return cfg

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A Config from a mapping such as `to_dict()` wrote (unknown keys are an error)."""
        return cls().with_overrides(values, validate=False).validate()

    def with_overrides(self, overrides: dict, *, validate: bool = True, merge: bool = False) -> "Config":
        """A copy with `overrides` applied; each value is parsed by the field's type. merge=True (a preset,
        YAML file or `--set` on top of another layer): a mapping-valued key (reward_kwargs,
        eval_reward_kwargs) merges into the current mapping key by key, a key set to None removing it."""
        types_ = field_types()
        changes = {}
        for key, value in overrides.items():
            if key not in types_:
                raise ValueError(unknown_key_message(key))
            changes[key] = value if key == "prompt_schedule" else coerce(key, value, types_[key])
            if merge and types_[key] is dict:
                changes[key] = merged_mapping(getattr(self, key), changes[key])
        if "prompt_schedule" in changes:  # a file path becomes the schedule it holds; errors name the steps
            changes["prompt_schedule"] = schedule_value(changes["prompt_schedule"],
                                                        changes.get("num_steps", self.num_steps))
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

    def as_run(self) -> "Config":
        """This config without what one command asks for (overwrite, resume): what a run records in
        its config.yaml and checkpoints, so reusing that file never deletes or resumes anything."""
        return dataclasses.replace(self, **INVOCATION_KEYS)

    def validate(self, chain: bool = True) -> "Config":
        """Raise ValueError/TypeError naming the first bad value; returns self. chain=False skips the
        estimator's checks against num_steps and eta (for sampling, which runs no estimator)."""
        EstimatorOptions.validate(self)  # types of every field (a Config built directly bypasses parsing)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("rollout", self.rollout, ROLLOUTS)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        if self.device not in DEVICES and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {self.device!r}")
        if not self.model:
            raise ValueError("model must be 'default' or the path of a diffusers Stable Diffusion folder, got ''")
        if not self.prompts:
            raise ValueError(f"prompts must name a built-in set ({', '.join(PROMPT_SETS)}) or a file, got ''")
        self._check_ranges()
        self._check_combinations()
        if chain:
            self.check_chain(self.num_steps, self.eta)
        return self

    def _check_ranges(self) -> None:
        """The bounds a field's `low` or `positive` cannot say (rlr_fast.options.check_bounds checks those)."""
        if self.lr > 1:  # AdamW moves each weight by about lr a step; far above 1 its float32 step overflows
            raise ValueError(f"lr must be at most 1 (AdamW moves each LoRA weight by about lr per step), got {self.lr}")
        if self.resolution is not None:
            sides = (self.resolution,) if isinstance(self.resolution, int) else self.resolution
            if any(v <= 0 for v in sides):
                raise ValueError(f"resolution must be positive pixels (an int or [height, width]), got "
                                 f"{self.resolution!r}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas}")

    def _check_combinations(self) -> None:
        """Values that must agree with each other."""
        if self.eval_every and not self.eval_seeds:
            raise ValueError(f"eval_every={self.eval_every} needs at least one seed in eval_seeds, got []")
        stray = sorted(set(self.eval_reward_kwargs) - set(self.eval_rewards))
        if stray:
            raise ValueError(f"eval_reward_kwargs names {stray}, which eval_rewards ({list(self.eval_rewards)}) "
                             "does not list; options of the trained reward go in reward_kwargs")
        if self.batch_size % self.images_per_prompt:
            raise ValueError(f"images_per_prompt={self.images_per_prompt} must divide batch_size={self.batch_size}")
        if self.baseline == "loo_prompt" and self.images_per_prompt < 2:
            raise ValueError("baseline='loo_prompt' needs images_per_prompt >= 2 (a leave-one-out mean over "
                             f"the other samples of the same prompt), got images_per_prompt={self.images_per_prompt}")
        if self.method in ("ddpo", "grpo"):
            self._check_ddpo()
        self._check_replay()
        if self.baseline == "loo" and self.batch_size < 2:
            raise ValueError(f"baseline='loo' needs batch_size >= 2, got {self.batch_size}")
        if self.needs_x0_hat and self.rollout == "cuda_graph":
            raise ValueError("baseline='value' scores each step's x0 estimate, which rollout='cuda_graph' does not "
                             "store; use rollout='auto' (eager with this baseline) or 'eager'")
        if self.needs_x0_hat and self.value_fit == "loo" and self.batch_size < 5:
            raise ValueError(f"baseline='value' with value_fit='loo' fits a slope on the other samples of a "
                             f"micro-batch, which needs batch_size >= 5 (got {self.batch_size}); use "
                             "value_fit='running', which adds earlier updates' samples")
        if self.prompt_schedule is not None:
            PromptSchedule.load(self.prompt_schedule, self.num_steps).check(self.num_steps)

    def _check_ddpo(self) -> None:
        """DDPO's epochs (grpo's too), and GRPO's groups."""
        if self.method == "grpo" and self.images_per_prompt < 2:
            raise ValueError("method='grpo' standardises each reward within its prompt's group of images_per_prompt "
                             f"samples, which needs images_per_prompt >= 2 (got {self.images_per_prompt}: every "
                             "advantage would be 0)")
        samples = self.ddpo_rollout_batches * self.batch_size
        if samples % self.ddpo_minibatches:
            raise ValueError(f"ddpo_minibatches={self.ddpo_minibatches} must divide the {samples} samples of an epoch "
                             f"(ddpo_rollout_batches={self.ddpo_rollout_batches} x batch_size={self.batch_size})")
        if self.ddpo_minibatches % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must divide ddpo_minibatches={self.ddpo_minibatches}: with "
                             f"{self.method} an optimizer step accumulates grad_accum minibatches of one pass. "
                             f"{self._ddpo_fix()}")
        if self.ddpo_min_count > self.ddpo_buffer_size:
            raise ValueError(f"ddpo_min_count={self.ddpo_min_count} must be <= ddpo_buffer_size="
                             f"{self.ddpo_buffer_size}, or a prompt's own statistics are never used")

    def _ddpo_fix(self) -> str:
        """Values of grad_accum / ddpo_minibatches / ddpo_rollout_batches that would pass `_check_ddpo`."""
        accums = [a for a in range(1, self.ddpo_minibatches + 1) if self.ddpo_minibatches % a == 0]
        samples = self.ddpo_rollout_batches * self.batch_size
        minibatches = [m for m in range(self.grad_accum, samples + 1, self.grad_accum) if samples % m == 0]
        keep = (f"ddpo_minibatches={' or '.join(map(str, minibatches))}" if minibatches else
                f"ddpo_rollout_batches={self.ddpo_rollout_batches * self.grad_accum} with ddpo_minibatches="
                f"{self.grad_accum}")
        return (f"Set grad_accum to {' or '.join(map(str, accums))}, or, keeping grad_accum={self.grad_accum}, {keep} "
                f"(the minibatches split the epoch's ddpo_rollout_batches x batch_size samples)")

    def _check_replay(self) -> None:
        check_min("replay_capacity", self.replay_capacity, 0)
        check_min("replay_ratio", self.replay_ratio, 1)
        check_choice("replay_sampling", self.replay_sampling, REPLAY_SAMPLINGS)
        if self.replay_capacity and self.method != "sqdf":
            raise ValueError(f"replay_capacity is used by method='sqdf' only, not by method={self.method!r}; "
                             "set replay_capacity=0")
        chains = self.batch_size * self.grad_accum
        if 0 < self.replay_capacity < chains:
            raise ValueError(f"replay_capacity={self.replay_capacity} is smaller than one update's {chains} chains "
                             f"(batch_size={self.batch_size} x grad_accum={self.grad_accum}), which each draw "
                             "takes from the buffer")

    def notices(self) -> list[str]:
        """What a run should say on stderr at its start about settings that are valid but easy to miss."""
        notes = []
        if self.prompt_schedule is not None:
            notes.append(f"note: a prompt schedule is active: the prompts of {len(self.prompt_schedule)} base "
                         "prompt(s) change along the chain (prompt_schedule; docs/training.md, 'Prompt schedules')")
        if self.warmup_steps > self.train_steps:
            notes.append(f"note: warmup_steps={self.warmup_steps} > train_steps={self.train_steps}: the learning rate "
                         f"ends at {self.train_steps / self.warmup_steps:.2g} x lr, still warming up")
        return notes

    def estimator_options(self) -> EstimatorOptions:
        """The estimator's share of this config, for `estimate` and `plan`."""
        return EstimatorOptions.of(self)


def merged_mapping(old: dict, new: dict) -> dict:
    """`new` merged into `old` key by key (nested mappings too); a key whose new value is None is removed."""
    out = dict(old)
    for key, value in new.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged_mapping(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# Keys and their types


def field_types() -> dict[str, Any]:
    """Config key -> resolved type annotation, in declaration order."""
    return _field_types(Config)


def unknown_key_message(key: str) -> str:
    return _unknown_key(key, field_types())


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
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config file {path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def load_config(preset: Optional[str] = None, path: Optional[str | Path] = None, sets: tuple[str, ...] = (),
                base: Optional[Config] = None) -> Config:
    """The config of a run: `base` or a preset (argument, else `--set preset=NAME`, else the YAML's
    `preset:` key, else demo), then the YAML file's keys, then the `--set key=value` overrides. Mappings
    (reward_kwargs, eval_reward_kwargs) merge key by key across these layers; a method switched to one
    whose own settings the base leaves neutral is refused (`check_method_switch`), and so is a `--set`
    estimator option that the method ignores (the preset's and the file's are dropped: `EstimatorOptions.of`)."""
    data = read_yaml(path) if path is not None else {}
    if "overwrite" in data and coerce("overwrite", data["overwrite"], bool):
        raise ValueError(f"config file {path} sets overwrite: {data['overwrite']}; deleting an earlier run is "
                         "asked for on the command line only (--set overwrite=true), so a reused file never "
                         "deletes one")
    file_preset = data.pop("preset", None)
    overrides = dict(data)
    set_preset, set_keys = None, []
    for text in sets:
        key, value = parse_set(text)
        set_keys.append(key)
        if key == "preset":
            set_preset = value
        elif field_types().get(key) is dict and key in overrides:
            overrides[key] = merged_mapping(coerce(key, overrides[key], dict), coerce(key, value, dict))
        else:
            overrides[key] = value
    if preset is not None and set_preset is not None and set_preset != preset:
        raise ValueError(f"--preset {preset} and --set preset={set_preset} disagree; choose one preset")
    name = preset or set_preset or file_preset
    cfg = base if base is not None and name is None else Config.from_preset(name or "demo")
    check_method_switch(cfg, overrides)
    cfg = cfg.with_overrides(overrides, merge=True)
    cfg.check_used(set_keys)
    return cfg


# A method whose settings keep neutral defaults in every other preset, and the key that must then be
# given: switching to it by an override alone would silently run without its own terms.
METHOD_PRESETS = {"sqdf": "sqdf_alpha"}


def check_method_switch(base: Config, overrides: dict) -> None:
    """Refuse `method=sqdf` on a base of another method unless `sqdf_alpha` is set too: the base's
    sqdf_alpha 0, sqdf_gamma 1 and replay_capacity 0 would turn SQDF's KL term and replay off."""
    method = str(overrides.get("method", base.method))
    key = METHOD_PRESETS.get(method)
    if key is None or base.method == method or key in overrides:
        return
    own = {k: PRESETS[method][k] for k in ("sqdf_alpha", "sqdf_gamma", "replay_capacity")}
    neutral = {k: getattr(base, k) for k in own}
    raise ValueError(f"method={method} on preset {base.preset!r} would run with {neutral} (its KL term and replay "
                     f"off); start from --preset {method} (its own {own}), or also set {key} (0: no KL term, "
                     "knowingly)")


def config_help(preset: str = "demo") -> str:
    """Every config key with its type, its value in `preset` and its documentation."""
    values = Config.from_preset(preset)
    rows = []
    for f in dataclasses.fields(Config):
        tp = type_name(field_types()[f.name])
        rows.append(f"  {f.name} ({tp}, {preset}: {getattr(values, f.name)!r})\n      {f.metadata['doc']}")
    return "\n".join(rows)
