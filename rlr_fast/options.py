"""Every knob of a gradient estimate in one validated dataclass, and the typed-field machinery
that Config shares with it.

    opts = EstimatorOptions(method="rlr", h=4, baseline="loo")    # validated on construction
    opts = EstimatorOptions.build(opts, max_batch=8)              # a validated copy with overrides
    opts.check_chain(num_steps=50, eta=1.0)                       # the checks that need T

`estimate` and `plan` take an EstimatorOptions; `Config` inherits it, so the same keys are YAML and
`--set` keys and are validated by the same code. Fields carry their documentation in
`metadata["doc"]` (`rlr-fast finetune --help` prints it). Values given as text (YAML, `--set`)
are parsed by the field's type annotation; a bad key or value raises a ValueError/TypeError
naming it. The estimators are specified in docs/estimator.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional, Union

import yaml

METHODS = ("rlr", "full_bp", "truncated_bp", "zo", "ddpo", "grpo", "sqdf")
# A method value for a run (Config, finetune) only: rlr_fast.design chooses the concrete estimator.
AUTO = "auto"
BASELINES = ("none", "loo", "loo_prompt", "value")
VALUE_FITS = ("loo", "running")
# what the value baseline's q_t scores at each step's x0 estimate: the reward itself (one reward call on the
# batch per likelihood-ratio step) or a regression of R on x0 fitted on earlier estimates' (x0, R) pairs
VALUE_PROXIES = ("reward", "surrogate")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")  # fused DDIM step; rlr_fast.ddim dispatches
# the estimator options that trade memory for time and leave the estimate unchanged: the planner sets them, a
# design keeps them
MEMORY_OPTIONS = ("max_batch", "checkpoint_unet", "split_cfg")
LIKELIHOOD_RATIO_METHODS = ("rlr", "zo", "ddpo", "grpo")
# The methods that read each option (options not listed are read by every method): a value set away
# from its default for another method is refused (EstimatorOptions.check_used).
_TERMS = ("rlr", "full_bp", "truncated_bp", "zo")  # estimates built from F / H / C terms
USED_BY = {
    "first_order_steps": ("rlr",), "h": ("rlr",), "j": ("rlr",), "zo_steps": ("rlr", "zo"),
    "baseline": ("rlr", "zo"), "value_fit": ("rlr", "zo"), "value_proxy": ("rlr", "zo"), "value_decay": ("rlr", "zo"),
    "normalize": _TERMS, "truncated_bp_k": ("truncated_bp",), "clip_range": ("ddpo", "grpo"),
    "sqdf_alpha": ("sqdf",), "sqdf_gamma": ("sqdf",), "sqdf_steps": ("sqdf",), "x0_estimator": ("sqdf",),
    "consistency_model": ("sqdf",), "consistency_steps": ("sqdf",), "consistency_guidance": ("sqdf",),
    "sqdf_reward_mask": ("sqdf",), "aim_steps": ("rlr", "zo"), "aim_share": ("rlr", "zo"),
    "max_batch": ("rlr", "zo", "ddpo", "grpo"), "grpo_beta": ("grpo",), "grpo_step_fraction": ("grpo",),
}


def uses(method: str, name: str) -> bool:
    """Whether `method` reads the estimator option `name` (method='auto' may choose any)."""
    return method == AUTO or method in USED_BY.get(name, METHODS)


def read_by(method: str, settings: dict) -> dict:
    """`settings` (config keys) without the estimator options that `method` does not read: one case written once
    and run with several methods (giving full_bp RLR's h is an error)."""
    names = EstimatorOptions.names()
    return {k: v for k, v in settings.items() if k not in names or uses(method, k)}


def option(default: Any, doc: str, *, low: Optional[int] = None, positive: bool = False):
    """A dataclass field with its documentation (read by --help) and its bounds (`check_bounds`): at least `low`,
    or finite and > 0 with `positive` (None passes either: it means "not set")."""
    metadata = {"doc": doc, "low": low, "positive": positive}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------------------------
# Typed fields: parsing text by annotation, one-line errors


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a dataclass, in declaration order."""
    return dict(_field_types(cls))


def unknown_key_message(key: str, names, what: str = "config key", where: str = "rlr-fast finetune --help") -> str:
    names = list(names)
    # keys sharing the first word ("lr_rate" -> "lr") beat mere spelling similarity ("lora_rank")
    same_head = [n for n in names if n.split("_")[0] == key.split("_")[0]]
    close = difflib.get_close_matches(key, same_head or names, n=1, cutoff=0.0)
    return f"unknown {what} {key!r}; did you mean {close[0]!r}? ({where} lists every key)"


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
# Union members are tried in this order: bool before numbers so "true" stays a bool, numbers before
# tuples and str so "0.5" is a float, tuples before str so "[0.2, 0.8]" is a list of weights.
_UNION_ORDER = (bool, int, float, tuple)


def _union_rank(tp) -> int:
    base = typing.get_origin(tp) or tp
    return _UNION_ORDER.index(base) if base in _UNION_ORDER else len(_UNION_ORDER)


def coerce(key: str, value: Any, tp) -> Any:
    """`value` as type `tp`: text (from --set or YAML) is parsed; other values must already fit.

    Raises TypeError naming the key, the expected type and the value.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for arg in sorted((a for a in args if a is not type(None)), key=_union_rank):
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


def check_types(obj) -> None:
    """Every field of a dataclass instance fits its annotation (a value built directly bypasses parsing)."""
    for key, tp in _field_types(type(obj)):
        coerce(key, getattr(obj, key), tp)


def check_bounds(obj) -> None:
    """Every field of a dataclass instance within the bounds its `option` declares."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if f.metadata.get("low") is not None:
            check_min(f.name, value, f.metadata["low"])
        if f.metadata.get("positive"):
            check_positive(f.name, value)


def check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}{hint}")


def check_min(key: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")


def check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be > 0, got {value}")


# ----------------------------------------------------------------------------------------------
# The estimator's options


@dataclass
class EstimatorOptions:
    """How one gradient estimate is made (docs/estimator.md) and how its steps run (memory vs speed).

    Defaults are the library's neutral ones; `rlr_fast.config` presets set the runs we ship.
    """

    method: str = option("rlr", f"gradient estimator: {', '.join(METHODS)}, or for a run {AUTO} (rlr_fast.design "
                                f"chooses an unbiased one from pilot rollouts; design_* keys)")
    first_order_steps: int = option(1, "rlr: f, the last steps estimated pathwise from dR/dx0", low=0)
    h: int = option(2, "rlr: length of the half-order sub-chain", low=1)
    j: Union[int, str, tuple[float, ...]] = option(
        "uniform", "rlr: start j of the sub-chain: an int, 'uniform', or a weight per j = 0, 1, ... (zero "
                   "outside the valid range)")
    zo_steps: Optional[int] = option(None, "rlr/zo: k, the likelihood-ratio steps drawn per update from C (the "
                                           "steps estimated by likelihood ratio: rlr's outside the pathwise F and "
                                           "half-order H, zo's every stochastic one), each weighted |C|/k, |C| "
                                           "the number of steps in C, so the sum stays unbiased (None: all of C)",
                                           low=1)
    baseline: Union[float, str] = option("none", "reward baseline of likelihood-ratio terms: none, loo (batch "
                                                 "leave-one-out), loo_prompt (per prompt), value (per step, fitted "
                                                 "on the reward of the rollout's x0 estimate; rollout with "
                                                 "store_x0_hat=True) or a number")
    value_fit: str = option("running", "baseline=value: fit each step's b = a q + c on the batch's other samples "
                                       "and earlier estimates' (running; estimate(value_state=...), which finetune "
                                       "keeps and checkpoints) or on the batch's other samples only (loo: a slope "
                                       "needs 4 of them, so batch >= 5)")
    value_proxy: str = option("reward", "baseline=value: q_t is the reward of the step's x0 estimate (reward, one "
                                        "reward call per likelihood-ratio step) or a ridge regression of R on "
                                        "pooled pixels of x0 fitted on earlier estimates' (x0, R) pairs only "
                                        "(surrogate: no extra reward calls; value_state carries the fit)")
    value_decay: float = option(0.9, "baseline=value, value_fit=running: weight kept per estimate by earlier "
                                     "samples (0..1; 1 never forgets)")
    normalize: Union[bool, float] = option(False, "divide the whole estimate by the batch reward std (true; "
                                                  "slightly biased) or by a given positive scale")
    truncated_bp_k: Union[int, str] = option(1, "truncated_bp: steps back-propagated (K), or 'random'")
    clip_range: float = option(1e-4, "ddpo/grpo: PPO clip range of the importance ratio (grpo: of the ratio of "
                                     "per-element-mean log-densities, as Flow-GRPO's and ddpo-pytorch's)",
                                 positive=True)
    grpo_beta: float = option(0.0, "grpo: weight of the KL of each trained step to the adapter-off reference's, the "
                                   "closed-form Gaussian KL per latent element (0: no KL term and no reference "
                                   "forwards; docs/estimator.md §8.5)")
    grpo_step_fraction: float = option(1.0, "grpo: fraction in (0, 1] of the stochastic steps each minibatch trains "
                                            "on, that many (at least one) drawn uniformly without replacement per "
                                            "minibatch; 1: every step")
    sqdf_alpha: float = option(0.0, "sqdf: weight alpha of the KL of each trained step to the base model's, the KL "
                                    "summed over the latent's D elements (the public SQDF code's alpha is "
                                    "sqdf_alpha * D / 2; docs/estimator.md §11)")
    sqdf_gamma: float = option(1.0, "sqdf: discount in (0, 1]: the reward term of step k is weighted "
                                    "gamma ** (steps after k)")
    sqdf_steps: Optional[tuple[int, int]] = option(None, "sqdf: the steps k drawn per sample, uniformly among the "
                                                         "stochastic ones of [first, stop) in sampling order (0 "
                                                         "the noisiest), as range(first, stop); None: every step")
    x0_estimator: Union[str, Callable] = option("tweedie", "sqdf: the estimate of x_0 scored as the soft Q: 'tweedie' "
                                                           "(the base model at the next step), 'consistency' (the "
                                                           "latent consistency model of consistency_model, "
                                                           "rlr_fast.consistency) or, from Python, a callable "
                                                           "(reference, states) -> x0_hat (rlr_fast.sqdf)")
    consistency_model: str = option("lcm-lora-sdv1-5", "sqdf, x0_estimator=consistency: a local LCM-LoRA folder "
                                                       "(loaded as a second adapter on the same UNet) or a full LCM "
                                                       "UNet folder")
    consistency_steps: int = option(1, "sqdf, x0_estimator=consistency: consistency steps from x_k to x_0", low=1)
    consistency_guidance: float = option(1.0, "sqdf, x0_estimator=consistency: guidance scale w of the consistency "
                                              "model (1: the conditional prompt alone, as the public SQDF code)")
    sqdf_reward_mask: bool = option(False, "sqdf: train only on samples whose soft Q is > 0, as the public code's "
                                           "rewards > 0 mask (docs/estimator.md §11.5 says why it is off)")
    aim_steps: Optional[tuple[float, float]] = option(None, "rlr/zo: aim j and the zo_steps subsample at the steps "
                                                            "[from, to) (fractions of the chain, as prompt_schedule "
                                                            "segments), importance-weighted (docs/estimator.md §12.1)")
    aim_share: float = option(0.8, "rlr/zo with aim_steps: probability mass of j (and share of the zo_steps "
                                   "subsample) on the aimed steps")
    max_batch: Optional[int] = option(None, "samples per UNet call in likelihood-ratio chunks (whole steps, at "
                                            "least one); None: one step's batch per call, so activation memory "
                                            "stays flat in T (larger values batch several steps per call: faster, "
                                            "more memory)", low=1)
    checkpoint_unet: bool = option(False, "gradient checkpointing inside each recomputed UNet step")
    split_cfg: bool = option(False, "guidance: run the unconditional and conditional passes as two calls "
                                    "(and back-propagate them one at a time)")
    backend: str = option("auto", "fused sampling-step backend, all the same op: 'auto' (triton, else cuda, on a "
                                  "GPU; cpu on the CPU; or $RLR_FAST_BACKEND), 'reference' (plain PyTorch, the "
                                  "specification), 'cpu' (the C++ extension), 'cuda' (its CUDA kernels) or "
                                  "'triton' (the Triton kernel, CUDA tensors)")

    accepts_auto: ClassVar[bool] = False  # Config (a run) may leave the method to rlr_fast.design

    def __post_init__(self):
        # a subclass (Config) is validated as a whole by its own validate(), which calls this one
        if type(self) is EstimatorOptions:
            self.validate()

    def validate(self):
        """Raise ValueError/TypeError naming the first bad estimator value; returns self."""
        check_types(self)
        check_bounds(self)
        if self.method == AUTO and not self.accepts_auto:
            raise ValueError("method='auto' is chosen by rlr_fast.design (finetune runs it); estimate needs a "
                             f"concrete method: one of {list(METHODS)}")
        check_choice("method", self.method, METHODS + ((AUTO,) if self.accepts_auto else ()))
        check_choice("backend", self.backend, BACKENDS)
        if isinstance(self.baseline, str):
            check_choice("baseline", self.baseline, BASELINES)
        check_choice("value_fit", self.value_fit, VALUE_FITS)
        check_choice("value_proxy", self.value_proxy, VALUE_PROXIES)
        if not 0 <= self.value_decay <= 1:
            raise ValueError(f"value_decay must be in [0, 1], got {self.value_decay}")
        if isinstance(self.j, str):
            check_choice("j", self.j, ("uniform",))
        elif isinstance(self.j, tuple):
            if not self.j or any(not (math.isfinite(w) and w >= 0) for w in self.j) or sum(self.j) <= 0:
                raise ValueError(f"j weights must be finite, >= 0 and positive somewhere, got {list(self.j)}")
        else:
            check_min("j", self.j, 0)
        if isinstance(self.truncated_bp_k, str):
            check_choice("truncated_bp_k", self.truncated_bp_k, ("random",))
        else:
            check_min("truncated_bp_k", self.truncated_bp_k, 1)
        if not (math.isfinite(self.grpo_beta) and self.grpo_beta >= 0):
            raise ValueError(f"grpo_beta must be >= 0 (the weight of a KL penalty), got {self.grpo_beta}")
        if not (math.isfinite(self.grpo_step_fraction) and 0 < self.grpo_step_fraction <= 1):
            raise ValueError(f"grpo_step_fraction must be in (0, 1], got {self.grpo_step_fraction}")
        if not (math.isfinite(self.sqdf_alpha) and self.sqdf_alpha >= 0):
            raise ValueError(f"sqdf_alpha must be >= 0 (the weight of a KL penalty), got {self.sqdf_alpha}")
        if not (math.isfinite(self.sqdf_gamma) and 0 < self.sqdf_gamma <= 1):
            raise ValueError(f"sqdf_gamma must be in (0, 1], got {self.sqdf_gamma}")
        if self.sqdf_steps is not None:
            first, stop = self.sqdf_steps
            check_min("sqdf_steps[0]", first, 0)
            if stop <= first:
                raise ValueError(f"sqdf_steps={list(self.sqdf_steps)} is an empty range: steps are drawn from "
                                 f"[first, stop), so stop must exceed first")
        if isinstance(self.x0_estimator, str):
            check_choice("x0_estimator", self.x0_estimator, ("tweedie", "consistency"))
        if not (math.isfinite(self.consistency_guidance) and self.consistency_guidance >= 1):
            raise ValueError(f"consistency_guidance must be >= 1 (1: no guidance), got {self.consistency_guidance}")
        if self.aim_steps is not None:
            first, stop = self.aim_steps
            if not 0 <= first < stop <= 1:
                raise ValueError(f"aim_steps={list(self.aim_steps)} must be fractions of the chain with "
                                 "0 <= from < to <= 1")
            if self.j != "uniform":
                raise ValueError(f"aim_steps sets the j distribution itself; leave j='uniform' (got j={self.j!r})")
        if not 0 < self.aim_share < 1:
            raise ValueError(f"aim_share must be in (0, 1) so that every step keeps a chance, got {self.aim_share}")
        if not isinstance(self.normalize, bool) and not (math.isfinite(self.normalize) and self.normalize > 0):
            raise ValueError(f"normalize must be true/false or a positive scale, got {self.normalize}")
        if type(self) is EstimatorOptions:  # a Config keeps every method's keys; `of` passes on the method's
            self.check_used()
        return self

    def check_used(self, given: Optional[Iterable[str]] = None) -> None:
        """Every option (of `given`, the keys a user set; None: all) set away from its default is one this
        method reads (else a one-line error). A Config checks only what the user gave: a preset's or a config
        file's values for other methods are dropped by `of` (a run's config.yaml holds every key)."""
        defaults = EstimatorOptions.__dataclass_fields__
        given = set(self.names() if given is None else given)
        for name in [n for n in self.names() if n in given]:
            if not uses(self.method, name) and getattr(self, name) != defaults[name].default:
                raise ValueError(f"{name}={getattr(self, name)!r} is ignored by method={self.method!r} (it is read by "
                                 f"{', '.join(m for m in METHODS if uses(m, name))}); leave it at its default "
                                 f"{defaults[name].default!r}")

    def check_chain(self, num_steps: int, eta: float) -> None:
        """The checks that need the chain: step counts fit in T, likelihood ratios have noise.

        Deterministic steps inside a stochastic chain (e.g. a final sigma = 0 step) are checked
        against the trajectory itself by the estimator.
        """
        T = num_steps
        if self.method == "rlr":
            f, h = self.first_order_steps, self.h
            if f + h > T:
                raise ValueError(f"h={h} is too large for num_steps={T}: rlr needs first_order_steps + h <= "
                                 f"num_steps ({f} + {h} > {T})")
            if isinstance(self.j, int) and not f <= self.j <= T - h:
                raise ValueError(f"j={self.j} is outside first_order_steps..num_steps-h = {f}..{T - h}")
            if self.zo_steps is not None and not self.zo_steps <= max(T - f - h, 0):
                raise ValueError(f"zo_steps={self.zo_steps} must be in 1..{T - f - h} (the steps outside F "
                                 "and H), or None")
        if self.method == "zo" and self.zo_steps is not None and not self.zo_steps <= T:
            raise ValueError(f"zo_steps={self.zo_steps} must be in 1..num_steps={T}, or None")
        if self.method == "truncated_bp" and isinstance(self.truncated_bp_k, int) and not self.truncated_bp_k <= T:
            raise ValueError(f"truncated_bp_k={self.truncated_bp_k} must be in 1..num_steps={T}")
        if self.method == "sqdf":
            if self.sqdf_steps is not None and self.sqdf_steps[1] > T:
                raise ValueError(f"sqdf_steps={list(self.sqdf_steps)} reaches past the chain: stop must be <= "
                                 f"num_steps={T}")
            if eta == 0:
                raise ValueError("method='sqdf' takes a reparameterised step with fresh noise and a KL between "
                                 "Gaussians of std sigma: eta must be > 0, got eta=0")
        if self.method in LIKELIHOOD_RATIO_METHODS and eta == 0 and not (
                self.method == "rlr" and self.first_order_steps == T):
            raise ValueError(f"method={self.method!r} uses likelihood ratios, which need noise: eta must be > 0, "
                             "got eta=0")

    @property
    def needs_x0_hat(self) -> bool:
        """The rollout must store each step's x0 estimate (`rollout(..., store_x0_hat=True)`)."""
        return self.baseline == "value" and self.method in ("rlr", "zo")

    @property
    def needs_value_state(self) -> bool:
        """`estimate` needs a `ValueStatistics` carried across estimates (`value_state=`): the running fit,
        or the surrogate proxy's regression, both fitted on earlier estimates."""
        return self.needs_x0_hat and (self.value_fit == "running" or self.value_proxy == "surrogate")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(EstimatorOptions))

    @classmethod
    def of(cls, source) -> "EstimatorOptions":
        """The estimator options held by `source` (an EstimatorOptions or a subclass such as Config)."""
        if not isinstance(source, EstimatorOptions):
            raise TypeError(f"expected EstimatorOptions (or a Config), got {type(source).__name__}")
        if type(source) is EstimatorOptions:
            return source
        return cls.carried(source, source.method)

    @classmethod
    def carried(cls, source, to: str, **changes) -> "EstimatorOptions":
        """The options of `source` that method `to` reads (the others at their defaults), with `changes`:
        a Config's keys for other methods, or an estimate's options switched to another method, are
        dropped rather than refused."""
        kept = {n: getattr(source, n) for n in cls.names() if uses(to, n) and n not in changes}
        return EstimatorOptions(**{**kept, "method": to, **changes})

    @classmethod
    def build(cls, options: Optional["EstimatorOptions"] = None, **overrides) -> "EstimatorOptions":
        """`options` (or the defaults) with `overrides` parsed by type and validated. Switching `method`
        keeps only the options the new method reads; an override it ignores is an error."""
        base = EstimatorOptions() if options is None else cls.of(options)
        types_ = field_types(EstimatorOptions)
        for key in overrides:
            if key not in types_:
                raise TypeError(unknown_key_message(key, types_, "estimator option",
                                                    "rlr_fast.options.EstimatorOptions"))
        if not overrides:
            return base  # validated when it was made
        changes = {k: coerce(k, v, types_[k]) for k, v in overrides.items()}
        if changes.get("method", base.method) != base.method and changes["method"] in METHODS:
            return cls.carried(base, changes["method"], **changes)
        return dataclasses.replace(base, **changes)
