"""Choosing the memory options of one update: the least recomputation whose estimated peak fits.

The planner reads a `Config` (the estimator's options and the run's shape: batch, T, guidance,
LoRA rank, dtype, resolution, reward) and adds only what a Config does not say: the networks'
architectures (from the config's model folder; where it is not there, the built-in architecture
its name is known for, architectures.KNOWN_FOLDERS, else SD1.4's) and the attention kernel. The
peak is the resident bytes (weights, LoRA + AdamW state, the stored trajectory) plus the largest
phase (phases.py).

Precision, as `finetune` runs on a GPU with dtype float16 or bfloat16: frozen weights in that
dtype; the UNet (rollout and recomputed steps) under CUDA autocast, because its float32 LoRA
meets half-precision weights and float32 latents there; the VAE decode and the reward network
outside autocast in their own weights' dtype (rewards.latent; the VAE's as the model family's
loader sets it: SDXL's own VAE in float32). LoRA, its gradient and AdamW's moments are float32.
With dtype float32 everything is float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import safetensors
import torch
from torch import nn

from ..config import Config
from ..costs import work
from ..options import MEMORY_OPTIONS, EstimatorOptions
from . import architectures as arch
from .measure import ATTENTIONS, GIB
from .phases import conditioning_shape, reward_phase_parts
from .table import MeasurementTable, dtype_name, default_table

# The options the planner chooses; Config keys, except checkpoint_reward: the reward's
# `checkpoint_vision` in reward_kwargs.
OPTION_NAMES = MEMORY_OPTIONS + ("checkpoint_vae", "decode_chunk", "free_text_encoder", "checkpoint_reward")
# How an option reads as the Config key that sets it.
CONFIG_KEYS = {"checkpoint_reward": "reward_kwargs.checkpoint_vision"}
# AdamW keeps two float32 moments per trainable value; the gradient is a third copy.
ADAMW_STATE_PER_PARAM = 2
# Rewards computed from the pixels alone (no network's weights or activations).
NETWORK_FREE_REWARDS = ("brightness", "color_match", "jpeg_compressibility", "jpeg_incompressibility")


@dataclass(frozen=True)
class Run:
    """One update as the planner sees it: a validated Config plus the architectures, on one rank."""

    config: Config
    samples: int  # the micro-batch one rank rolls out: config.batch_size / ranks
    components: dict  # "unet", "vae" and the family's text encoders -> constructor config
    ids: dict  # the same keys -> architecture_id
    reward: Union[str, nn.Module]  # "aesthetic", "pixels" or a reward network built on meta
    attention: str
    latent_hw: tuple[int, int]
    notes: tuple[str, ...]
    frames: Optional[int] = None  # a video UNet's frames per sample (None: an image UNet)

    @property
    def autocast(self) -> bool:
        return self.config.dtype != "float32"

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.float16 if self.autocast else torch.float32  # bfloat16: the same bytes

    @property
    def family(self):
        """The rlr_fast.families Family of the UNet: its text encoders, conditioning and VAE precision."""
        return arch.family(self.components["unet"])

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE's precision as the family's loader sets it (SDXL's own VAE: float32)."""
        return self.family.vae_dtype(self.components["vae"], self.weight_dtype)

    @property
    def reward_dtype(self) -> torch.dtype:
        """The reward network's precision: reward_kwargs' dtype, else the loaders' float32."""
        from ..rewards.loading import reward_dtype

        return reward_dtype(self.config.reward_kwargs.get("dtype", "float32"))

    @property
    def image_hw(self) -> tuple[int, int]:
        scale = 2 ** (len(self.components["vae"]["block_out_channels"]) - 1)
        return (self.latent_hw[0] * scale, self.latent_hw[1] * scale)

    @property
    def guidance(self) -> bool:
        return self.config.guidance_scale != 1.0

    @property
    def unet_latent(self) -> tuple[int, ...]:
        """One sample's latent shape after the channels: (h, w), or (frames, h, w) for a video UNet."""
        return self.latent_hw if self.frames is None else (self.frames,) + tuple(self.latent_hw)

    @property
    def images(self) -> int:
        """Images the VAE decodes and the reward scores in one micro-batch: every frame of every sample."""
        return self.samples * (self.frames or 1)

    @property
    def unet_checkpointing(self) -> bool:
        """Whether the UNet has gradient checkpointing (diffusers implements none for UNet3DConditionModel)."""
        return arch.unet_class(self.components["unet"])._supports_gradient_checkpointing


def as_config(config: Union[None, str, dict, EstimatorOptions] = None, **settings) -> Config:
    """A validated Config: a Config, a preset name, EstimatorOptions or a dict of Config keys (both on
    top of the `sd14` preset, or of the dict's own `preset`), or None (the sd14 preset); then `settings`."""
    if config is None or isinstance(config, str):
        return Config.from_preset(config or "sd14", **settings)
    if isinstance(config, Config):
        return config.with_overrides(settings)
    if isinstance(config, EstimatorOptions):
        return Config.from_preset("sd14", **dataclasses.asdict(config), **settings)
    if isinstance(config, dict):
        values = {**config, **settings}
        return Config.from_preset(values.pop("preset", "sd14"), **values)
    raise TypeError(f"config must be a Config, a preset name, EstimatorOptions or a dict of Config keys, "
                    f"got {type(config).__name__}")


def describe_run(cfg: Config, model=None, attention: str = "flash", ranks: int = 1) -> Run:
    """The Run of `cfg` on one of `ranks` data-parallel ranks (each rolls out batch_size / ranks samples);
    `model` ("sd14", "default", a folder or a dict of component configs) replaces the architectures read
    from cfg.model."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1 or cfg.batch_size % ranks:
        raise ValueError(f"ranks must be a positive int dividing batch_size={cfg.batch_size} (each rank rolls out "
                         f"batch_size / ranks samples), got {ranks!r}")
    if cfg.dtype == "float64":
        raise ValueError("the memory planner models a GPU's float32, float16 and bfloat16 runs, not dtype='float64' "
                         "(a CPU reproducibility mode): leave max_memory_gb unset")
    notes, motion_adapter = [], None
    if model is None:
        model, motion_adapter = cfg.model, cfg.motion_adapter
        if model != "default" and not Path(model).is_dir():
            built_in = arch.KNOWN_FOLDERS.get(Path(model).name, "sd14")
            notes.append(f"architecture: {built_in} (model folder {model!r} not found here)")
            model, motion_adapter = built_in, None
    components = arch.component_configs(model, motion_adapter)
    if components["unet"].get("_class_name") == "FluxTransformer2DModel":
        raise ValueError(f"the memory planner does not model FLUX's transformer (in {model}) yet: set max_batch, "
                         "checkpoint_unet, split_cfg and decode_chunk by hand")
    video = arch.unet_class(components["unet"]).__name__ in ("UNet3DConditionModel", "UNetMotionModel")
    reward = cfg.reward
    if isinstance(reward, nn.Module) and all(t.device.type == "meta" for t in arch.module_state(reward)):
        pass  # a reward network built on meta
    elif reward != "aesthetic":
        if reward not in NETWORK_FREE_REWARDS:
            notes.append(f"reward {getattr(reward, '__name__', reward)!r} is not modelled: counted without a "
                         "network (its weights and activations come on top)")
        reward = "pixels"
    if cfg.method == "sqdf" and cfg.x0_estimator == "consistency" and not Path(cfg.consistency_model).is_dir():
        notes.append(f"consistency_model folder {cfg.consistency_model!r} not found here: its weights are not counted")
    return Run(config=cfg, samples=cfg.batch_size // ranks, components=components,
               ids={k: arch.architecture_id(k, v) for k, v in components.items()},
               reward=reward, attention=attention,
               latent_hw=arch.latent_size(cfg.resolution, components), notes=tuple(notes),
               frames=cfg.num_frames if video else None)


@dataclass
class StepCounts:
    """How many steps of each kind one update recomputes (docs/estimator.md)."""

    pathwise: int  # recomputed one at a time with an input gradient
    likelihood_ratio: int  # parameter gradient only, several per call up to max_batch
    reward_grad: bool  # whether dR/dx0 is needed (a first-order term exists)
    forwards: int = 0  # UNet forwards without grad beyond the rollout's


def step_counts(cfg: Config) -> StepCounts:
    """rlr_fast.costs.work of the run's estimator, rounded up where a method draws its work (a random K,
    sqdf's step): memory is planned for the largest update."""
    w = work(cfg.estimator_options(), cfg.num_steps)
    return StepCounts(math.ceil(w.pathwise), math.ceil(w.likelihood_ratio), w.reward_backward_images > 0,
                      forwards=math.ceil(w.forwards))


class PlanError(ValueError):
    """No choice of the memory options fits the budget; `smallest` is the plan with the least peak."""

    def __init__(self, message: str, smallest: "Plan"):
        super().__init__(message)
        self.smallest = smallest


@dataclass
class Plan:
    """The chosen memory options of one update and its estimated peak."""

    run: Run
    max_memory_gb: Optional[float]
    options: dict  # OPTION_NAMES -> value
    peak_bytes: int
    breakdown: dict  # part -> bytes alive at the peak; sums to peak_bytes
    phases: dict  # every phase's activation bytes (only the largest is alive at the peak)
    peak_phase: str
    extra_flops: int  # forward FLOPs recomputed because of checkpointing
    model_calls: int  # UNet + VAE calls of one update
    notes: list = field(default_factory=list)
    reasons: dict = field(default_factory=dict)  # option -> why it has its value (`option_reasons`)

    @property
    def config(self) -> Config:
        return self.run.config

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.max_memory_gb is None or self.peak_bytes <= self.max_memory_gb * GIB

    def config_overrides(self) -> dict:
        """The options as Config keys: `cfg.with_overrides(plan.config_overrides())` runs them."""
        out = {k: v for k, v in self.options.items() if k != "checkpoint_reward"}
        kwargs = {k: v for k, v in self.config.reward_kwargs.items() if k != "checkpoint_vision"}
        if self.options["checkpoint_reward"]:
            kwargs["checkpoint_vision"] = True
        if kwargs != self.config.reward_kwargs:
            out["reward_kwargs"] = kwargs
        return out

    def estimator_options(self) -> EstimatorOptions:
        """The planned config's estimator options with the chosen max_batch, checkpoint_unet, split_cfg."""
        return EstimatorOptions.build(self.config.estimator_options(), max_batch=self.options["max_batch"],
                                      checkpoint_unet=self.options["checkpoint_unet"],
                                      split_cfg=self.options["split_cfg"])

    def table(self) -> str:
        """A markdown summary: options, then the breakdown at the peak and every phase."""
        lines = ["| config key | value | why |", "|---|---|---|"] + [
            f"| {CONFIG_KEYS.get(k, k)} | {v} | {self.reasons.get(k, '')} |" for k, v in self.options.items()]
        budget = "no budget" if self.max_memory_gb is None else f"budget {self.max_memory_gb:g} GiB"
        lines += ["", f"estimated peak {self.peak_gib:.2f} GiB (phase: {self.peak_phase}); {budget}", "",
                  "| part | GiB |", "|---|---|"]
        lines += [f"| {k} | {v / GIB:.3f} |" for k, v in self.breakdown.items()]
        lines += ["", "| phase (activations) | GiB |", "|---|---|"]
        lines += [f"| {k} | {v / GIB:.3f} |" for k, v in self.phases.items()]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def _resident(run: Run, options: dict, table: MeasurementTable) -> dict:
    cfg, components = run.config, run.components
    wd, rank = run.weight_dtype, cfg.lora_rank

    def unet_params(trainable: bool):
        unet = table.unet(components["unet"], wd, rank)
        return lambda: [p for p in unet.parameters() if p.requires_grad == trainable]

    def frozen(name: str, dtype: torch.dtype, module):
        return table.param_bytes(f"{run.ids[name]}|{dtype_name(dtype)}", lambda: arch.module_state(module()))

    lora = table.param_bytes(f"{run.ids['unet']}|lora{rank}", unet_params(True))
    parameters = (lora + table.param_bytes(f"{run.ids['unet']}|{dtype_name(wd)}", unet_params(False))
                  + frozen("vae", run.vae_dtype, lambda: table.vae(components["vae"], run.vae_dtype)))
    if run.reward != "pixels":
        dtype = run.reward_dtype
        parameters += table.param_bytes(f"reward:{arch.reward_id(run.reward)}|{dtype_name(dtype)}",
                                        lambda: arch.module_state(table.reward(run.reward, dtype, False)))
    if not options["free_text_encoder"]:
        for name in run.family.text_encoders:
            parameters += frozen(name, wd, lambda: arch.build(name, components[name], wd))
    B, T = run.samples, cfg.num_steps
    latent = components["unet"]["in_channels"] * math.prod(run.unet_latent) * 4  # float32 chain
    rows, width = conditioning_shape(table.unet(components["unet"], wd, rank))
    cond = B * rows * width * wd.itemsize * (2 if run.guidance else 1)
    trajectory = B * latent * (2 * T + 1) + B * T * 4 + cond + B * latent  # x_T..x_0, noises, log p, prompts, dR/dx0
    return {"parameters": parameters, "optimizer_state": lora * (1 + ADAMW_STATE_PER_PARAM), "trajectory": trajectory}


def _evaluate(run: Run, options: dict, counts: StepCounts, table: MeasurementTable,
              max_memory_gb: Optional[float]) -> Plan:
    cfg, hw = run.config, run.latent_hw
    B, T = run.samples, cfg.num_steps
    cfg_mode = "none" if not run.guidance else ("split" if options["split_cfg"] else "together")
    unet = dict(autocast=run.autocast, attention=run.attention, lora_rank=cfg.lora_rank, cfg_mode=cfg_mode)
    unet_args = (run.ids["unet"], run.components["unet"])

    latent, images = run.unet_latent, run.images  # a video's frames decode and score as images
    decode = table.decode_phase(run.ids["vae"], run.components["vae"], images, options["decode_chunk"], hw,
                                dtype=run.vae_dtype, attention=run.attention, grad=counts.reward_grad,
                                checkpoint_vae=options["checkpoint_vae"])
    network = table.reward_network(run.reward, images, run.image_hw, dtype=run.reward_dtype, attention=run.attention,
                                   grad=counts.reward_grad, checkpoint=options["checkpoint_reward"])
    phases = {"rollout": table.unet_phase(*unet_args, B, latent, grad="none", checkpoint=False, **unet),
              **reward_phase_parts(decode, network)}
    if counts.pathwise:
        phases["unet_step"] = table.unet_phase(*unet_args, B, latent, grad="input",
                                               checkpoint=options["checkpoint_unet"], **unet)
    if cfg.method == "sqdf" and cfg.x0_estimator == "consistency":  # docs/estimator.md §11.5: the VJP through
        # N consistency steps keeps N UNet steps (conditional only unless consistency_guidance > 1)
        guided = run.guidance and cfg.consistency_guidance != 1
        phases["consistency_x0"] = cfg.consistency_steps * table.unet_phase(
            *unet_args, B, latent, grad="input", checkpoint=False,
            **dict(unet, cfg_mode="together" if guided else "none"))
    steps_per_call = 0
    if counts.likelihood_ratio:
        steps_per_call = (options["max_batch"] or B) // B
        phases["lr_chunk"] = table.unet_phase(*unet_args, steps_per_call * B, latent, grad="params",
                                              checkpoint=options["checkpoint_unet"], **unet)
    resident = _resident(run, options, table)
    if cfg.method == "sqdf" and cfg.x0_estimator == "consistency":
        resident["consistency_weights"] = consistency_weight_bytes(cfg.consistency_model, run.weight_dtype)
    peak_phase = max(phases, key=phases.get)
    breakdown = dict(resident, **{name: (v if name == peak_phase else 0) for name, v in phases.items()})

    calls_per_step = 2 if cfg_mode == "split" else 1
    lr_calls = math.ceil(counts.likelihood_ratio / steps_per_call) if steps_per_call else 0
    model_calls = (calls_per_step * (T + counts.pathwise + lr_calls + counts.forwards)
                   + math.ceil(images / options["decode_chunk"]))
    extra = 0
    if options["checkpoint_unet"]:
        unet_flops = table.flops(f"{run.ids['unet']}|{'x'.join(map(str, latent))}",
                                 lambda: table.unet(run.components["unet"], torch.float32, 0), "unet", latent)
        extra += (counts.pathwise + counts.likelihood_ratio) * B * (2 if run.guidance else 1) * unet_flops
    if counts.reward_grad and options["checkpoint_vae"]:  # the chunk's and then each block's recomputation
        extra += 2 * images * table.flops(f"{run.ids['vae']}|{hw[0]}x{hw[1]}",
                                          lambda: table.vae(run.components["vae"], torch.float32), "vae_decode", hw)
    if counts.reward_grad and options["checkpoint_reward"]:
        extra += images * table.flops(f"reward:{arch.reward_id(run.reward)}|{run.image_hw[0]}x{run.image_hw[1]}",
                                 lambda: table.reward(run.reward, torch.float32, False), "reward", hw, run.image_hw)
    return Plan(run=run, max_memory_gb=max_memory_gb, options=dict(options), peak_bytes=sum(breakdown.values()),
                breakdown=breakdown, phases=phases, peak_phase=peak_phase, extra_flops=extra, model_calls=model_calls)


def consistency_weight_bytes(folder, dtype: torch.dtype) -> int:
    """Bytes of a consistency model's weights in `dtype` (rlr_fast.consistency loads them so): every
    tensor of the folder's (or its unet/'s) .safetensors files, read from their headers; 0 when the
    folder is not here (describe_run notes it)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) + sorted((folder / "unet").glob("*.safetensors"))
    elements = 0
    for file in files:
        with safetensors.safe_open(file, framework="pt") as f:
            elements += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return elements * dtype.itemsize


def _candidates(run: Run, counts: StepCounts) -> Iterator[dict]:
    B = run.samples
    both = (False, True)
    reward_ckpt = (True,) if run.config.reward_kwargs.get("checkpoint_vision") else \
        both if counts.reward_grad and run.reward != "pixels" else (False,)
    choices = {
        "max_batch": [None] + [B * m for m in range(2, counts.likelihood_ratio + 1)],  # None: one step per call
        "checkpoint_unet": (both if (counts.pathwise or counts.likelihood_ratio) and run.unet_checkpointing
                            else (False,)),
        "split_cfg": both if run.guidance else (False,),
        "checkpoint_vae": both if counts.reward_grad else (False,),
        "decode_chunk": range(1, run.images + 1),
        "free_text_encoder": both,
        "checkpoint_reward": reward_ckpt,
    }
    for values in itertools.product(*(choices[name] for name in OPTION_NAMES)):
        yield dict(zip(OPTION_NAMES, values))


def _cost(p: Plan) -> tuple:
    # least recomputation, then fewest (larger, more efficient) model calls, then the lowest peak
    # (so the text encoder, whose prompts are encoded before the loop, is freed when it costs nothing)
    return (p.extra_flops, p.model_calls, p.peak_bytes)


def plan(config: Union[None, str, dict, EstimatorOptions] = None, max_memory_gb: Optional[float] = None, *,
         model=None, attention: str = "flash", ranks: int = 1, table: Optional[MeasurementTable] = None,
         **settings) -> Plan:
    """Choose max_batch, checkpoint_unet, split_cfg, checkpoint_vae, decode_chunk, free_text_encoder and
    checkpoint_reward for one update so that its estimated peak fits `max_memory_gb` GiB (default: the
    config's max_memory_gb) with the least recomputation; without a budget, the fastest plan.

    `config`: a Config, a preset name, EstimatorOptions or a dict of Config keys (see `as_config`);
    `settings` are further Config keys. `model` overrides the architectures read from the config's
    model folder; `attention` is "flash" (SDPA's fused kernels, a GPU's default) or "math". `ranks`:
    the data-parallel ranks the config's batch_size is split over; the plan is one rank's, rolling out
    batch_size / ranks samples (the config itself stays the global, validated one).
    Raises PlanError, naming the smallest achievable peak and its options, when nothing fits.
    """
    cfg = as_config(config, **settings)
    budget = cfg.max_memory_gb if max_memory_gb is None else max_memory_gb
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"max_memory_gb must be > 0 or None, got {budget!r}")
    run = describe_run(cfg, model, attention, ranks)
    table = table or default_table()
    counts = step_counts(cfg)
    plans = [_evaluate(run, options, counts, table, budget) for options in _candidates(run, counts)]
    fitting = [p for p in plans if p.fits]
    if not fitting:
        smallest = min(plans, key=lambda p: (p.peak_bytes, _cost(p)))
        options = {CONFIG_KEYS.get(k, k): v for k, v in smallest.options.items()}
        raise PlanError(
            f"no memory plan fits max_memory_gb={budget}: the smallest achievable estimated peak is "
            f"{smallest.peak_gib:.2f} GiB (options {options}; largest phase {smallest.peak_phase}). "
            f"{_refusal_advice(smallest)}", smallest)
    chosen = min(fitting, key=_cost)
    chosen.notes = _notes(run)
    chosen.reasons = option_reasons(chosen, plans)
    return chosen


def _refusal_advice(smallest: Plan) -> str:
    """What to change when nothing fits, the largest lever first: float32 frozen weights (half the
    bytes with dtype=float16), then a float32 reward network, then the batch, pixels and budget."""
    cfg, parameters = smallest.config, smallest.breakdown["parameters"] / GIB
    if cfg.dtype == "float32":
        return (f"The frozen float32 weights alone are {parameters:.2f} GiB: set dtype=float16 (half their bytes; the "
                "UNet under autocast, LoRA and AdamW stay float32), or raise the budget.")
    if smallest.run.reward != "pixels" and smallest.run.reward_dtype == torch.float32:
        return ("The reward network is in float32: set reward_kwargs={dtype: float16}; or lower batch_size or "
                "resolution, or raise the budget.")
    return "Lower batch_size or resolution, use a smaller reward network, or raise the budget."


def option_reasons(chosen: Plan, plans: list[Plan]) -> dict:
    """Per option, why the chosen plan has its value: 'fixed' (the run leaves no other value), 'needed
    to fit' (every other value overflows the budget), the cheapest (the others fit but cost more
    FLOPs or model calls: 'cheapest'), or 'tie-break: lower peak' / 'tie-break: no effect' (another value fits at the
    same cost: the value is not advice)."""
    reasons = {}
    for name, value in chosen.options.items():
        others = [p for p in plans if p.options[name] != value
                  and all(p.options[k] == v for k, v in chosen.options.items() if k != name)]
        fitting = [p for p in others if p.fits]
        if not others:
            reasons[name] = "fixed"
        elif not fitting:
            reasons[name] = "needed to fit"
        elif any(_cost(p)[:2] == _cost(chosen)[:2] for p in fitting):
            same = [p for p in fitting if _cost(p)[:2] == _cost(chosen)[:2]]
            reasons[name] = ("tie-break: no effect" if all(p.peak_bytes == chosen.peak_bytes for p in same)
                             else "tie-break: lower peak")
        else:
            reasons[name] = "cheapest (the others recompute more or make more calls)"
    return reasons


def _notes(run: Run) -> list[str]:
    dtype = run.config.dtype
    vae = "float32 (its config says force_upcast)" if run.vae_dtype != run.weight_dtype else dtype
    precision = ("float32 weights and activations" if not run.autocast else
                 f"{dtype} weights; the UNet under CUDA autocast (group_norm / layer_norm outputs in float32); VAE "
                 f"decode outside autocast in {vae}; LoRA + AdamW in float32")
    reward = "" if run.reward == "pixels" else f"; reward network in {str(run.reward_dtype).replace('torch.', '')}"
    attention = ("flash / memory-efficient SDPA (no stored softmax)" if run.attention == "flash" else
                 "MATH SDPA (stores the softmax)")
    frames = "" if run.frames is None else f"{run.frames} frames of "
    unet = arch.unet_class(run.components["unet"]).__name__
    no_checkpointing = [] if run.unet_checkpointing else [
        f"{unet} has no gradient checkpointing: checkpoint_unet stays False"]
    return ["tensor bytes only (what torch.cuda.max_memory_allocated counts): the CUDA context (~0.3-0.5 GiB) "
            "and allocator caching come on top",
            f"attention: {attention}",
            precision + reward,
            f"{run.samples} samples of {frames}{run.image_hw[0]}x{run.image_hw[1]} px, "
            f"T = {run.config.num_steps}, method {run.config.method}"] + no_checkpointing + list(run.notes)
