"""The reward interface: the `Reward` base class, its input checks, `FunctionReward` for plain
callables, and the registry behind `get_reward(name)`.

A reward is called as `reward(images, prompts) -> (B,)` with `images` float in [0, 1], shape
(B, 3, H, W), and one prompt string per image. Every reward says whether gradients flow through
it (`.differentiable`): first-order estimators need dR/dx0, likelihood-ratio ones only the values.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from torch import nn

# A reward may return values a hair outside [0, 1] after resampling; anything further out is a
# different convention ([-1, 1] VAE output, [0, 255] pixels) and would silently give wrong scores.
_RANGE_SLACK = 0.01


def check_prompts(prompts: Sequence[str], batch_size: int) -> list[str]:
    """`prompts` as a list of `batch_size` strings, or a TypeError/ValueError saying what is wrong."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list with one string per image, got the single string {prompts!r}; "
                        f"pass [prompt] * {batch_size} to score every image against it")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"every prompt must be a str, got {type(bad[0]).__name__} ({bad[0]!r})")
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch_size} images; pass one prompt per image")
    return list(prompts)


def check_images(images: torch.Tensor) -> None:
    """Raise a TypeError/ValueError unless `images` is a float (B, 3, H, W) tensor in [0, 1]."""
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}"
                        + ("; divide uint8 pixels by 255" if images.dtype == torch.uint8 else ""))
    if images.numel() == 0:
        return
    low, high = torch.aminmax(images.detach())
    low, high = float(low), float(high)
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise ValueError(f"images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; VAE output in [-1, 1] "
                         "maps to [0, 1] as (x / 2 + 0.5).clamp(0, 1)")


class Reward(nn.Module):
    """Base class: subclasses implement `score(images, prompts) -> (B,)` and set `differentiable`.

    Calling the module checks its inputs and output, so `score` can assume a valid batch. It is an
    `nn.Module` so that rewards holding networks move with `.to(device)` like any model.
    """

    differentiable: bool = True

    def __init__(self) -> None:
        # An explicit no-option signature, so get_reward reports unknown options by reward name
        # instead of nn.Module's generic "unexpected keyword argument".
        super().__init__()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images)
        prompts = check_prompts(prompts, images.shape[0])
        values = self.score(images, prompts)
        return check_values(values, images, self)

    def features(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, D) embeddings of `images` by the reward's image network (a CLIP vision tower, say), the
        feature space `rlr-fast evaluate` measures diversity in; None for a reward without one."""
        return None


def check_values(values, images: torch.Tensor, reward: object) -> torch.Tensor:
    if not torch.is_tensor(values):
        try:  # numpy arrays and lists of floats are fine from a user callable; they carry no gradient
            values = torch.as_tensor(values, dtype=torch.float32, device=images.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"reward {reward!r} returned {type(values).__name__}, expected a (B,) tensor") from e
    if values.shape != (images.shape[0],):
        raise ValueError(f"reward {reward!r} returned shape {tuple(values.shape)} for {images.shape[0]} images; "
                         "a reward returns one value per image, shape (B,)")
    return values


class FunctionReward(Reward):
    """A plain callable `fn(images, prompts) -> (B,)` as a Reward.

    `differentiable=None` (unknown) is taken as True until a call shows otherwise: when the images
    require grad and the returned values have no gradient path, `.differentiable` becomes False.
    Declared `differentiable=False` detaches the values, so they never carry a gradient path.
    """

    def __init__(self, fn: Callable, differentiable: Optional[bool] = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"a reward must be a registered name or a callable, got {type(fn).__name__}")
        try:
            inspect.signature(fn).bind(None, None)
        except TypeError as e:
            raise TypeError(f"reward callable {fn!r} must accept (images, prompts): {e}") from e
        except ValueError:  # builtins without an inspectable signature: trust the caller
            pass
        self.fn = fn
        self.detect_differentiable = differentiable is None
        self.differentiable = True if differentiable is None else bool(differentiable)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        values = check_values(self.fn(images, prompts), images, self)
        if self.detect_differentiable and images.requires_grad and torch.is_grad_enabled():
            self.differentiable = values.requires_grad
            self.detect_differentiable = False
        return values if self.differentiable else values.detach()

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)!r}, differentiable={self.differentiable}"


RewardFactory = Callable[..., Union[Reward, Callable]]
_REGISTRY: dict[str, RewardFactory] = {}


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make `get_reward(name, **kwargs)` build the decorated Reward class (or factory)."""
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"a reward name must be a non-empty str, got {name!r}")
    key = _normalise_name(name)

    def decorator(factory: RewardFactory) -> RewardFactory:
        if not callable(factory):
            raise TypeError(f"register_reward({name!r}) decorates a Reward class or a factory, got {factory!r}")
        if key in _REGISTRY and _REGISTRY[key] is not factory:
            raise ValueError(f"a reward named {key!r} is already registered ({_REGISTRY[key]!r})")
        _REGISTRY[key] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def get_reward(name_or_callable: Union[str, Callable, Reward], **kwargs) -> Reward:
    """A Reward from a registered name (kwargs go to its constructor), a Reward, or a callable.

    A plain callable `fn(images, prompts)` is wrapped in `FunctionReward`; pass
    `differentiable=True/False` to declare whether it is differentiable (default: detected).
    """
    if isinstance(name_or_callable, Reward):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} cannot be applied to the already built reward "
                            f"{name_or_callable!r}")
        return name_or_callable
    if isinstance(name_or_callable, str):
        key = _normalise_name(name_or_callable)
        if key not in _REGISTRY:
            close = difflib.get_close_matches(key, _REGISTRY, n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown reward {name_or_callable!r}{hint} Available: {', '.join(available_rewards())}")
        factory = _REGISTRY[key]
        signature = inspect.signature(factory).replace(return_annotation=inspect.Signature.empty)
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            raise TypeError(f"reward {key!r} takes the options {signature}, got {sorted(kwargs)}: {e}") from None
        reward = factory(**kwargs)
        return reward if isinstance(reward, Reward) else FunctionReward(reward)
    if callable(name_or_callable):
        unknown = set(kwargs) - {"differentiable"}
        if unknown:
            raise TypeError(f"a callable reward takes only the option 'differentiable', got {sorted(unknown)}")
        return FunctionReward(name_or_callable, **kwargs)
    raise TypeError("a reward must be a registered name, a Reward or a callable, "
                    f"got {type(name_or_callable).__name__}")
