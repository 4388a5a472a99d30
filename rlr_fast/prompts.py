"""Prompt schedules (the diffusive chain of thought, docs/estimator.md §12): prompts that change with the step.

A schedule gives some base prompts a list of segments, each a prompt and the part of the chain it
conditions, as fractions of the T sampling steps (so one schedule serves any T):

    a red circle on a blue background:
      - {prompt: a circle on a blue background, from_step: 0.0, to_step: 0.5}   # early, noisy steps
      - {prompt: a red circle on a blue background, from_step: 0.5, to_step: 1.0}

Step k = 0 .. T-1 (scheduler order, k = 0 the noisiest) takes the segment with
from_step <= k / T < to_step. A base prompt's segments must cover [0, 1] exactly, without gaps or
overlaps, and each must get at least one step at the run's T; base prompts without a schedule
condition every step. `PromptSteps` turns a prompt list and a schedule into every distinct text
and a (base prompt, step) table of indices into them; `PromptBank` encodes each text once, and
its `batch(ids)` / `step_conditioning` give rollout's `encoder_hidden_states` (one embedding per
distinct prompt of the batch) and `prompt_index` (T, B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

SEGMENT_KEYS = ("prompt", "from_step", "to_step")


@dataclass(frozen=True)
class Segment:
    """One prompt and the fractions [from_step, to_step) of the chain it conditions."""

    prompt: str
    from_step: float
    to_step: float

    def steps(self, num_steps: int) -> range:
        """The steps k with from_step <= k / T < to_step."""
        first = next((k for k in range(num_steps) if k / num_steps >= self.from_step), num_steps)
        end = next((k for k in range(num_steps) if k / num_steps >= self.to_step), num_steps)
        return range(first, end)


def _steps_in(start: float, end: float, num_steps: Optional[int]) -> str:
    """' (steps a..b of num_steps=T)' for the part [start, end) of the chain, when T is known."""
    if num_steps is None:
        return ""
    steps = Segment("", start, end).steps(num_steps)
    if not steps:
        return f" (no whole step at num_steps={num_steps}, but the schedule must hold for any T)"
    named = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}..{steps[-1]}"
    return f" ({named} of num_steps={num_steps})"


class PromptSchedule:
    """Per base prompt, its segments sorted by from_step, checked to tile the chain [0, 1]."""

    def __init__(self, segments: dict[str, list[Segment]]):
        self.segments = segments

    @classmethod
    def load(cls, spec, num_steps: Optional[int] = None) -> "PromptSchedule":
        """A schedule from a mapping, a YAML file's path, or YAML text (what `--set` passes).

        `num_steps`, when known, lets errors name the steps a gap or an overlap concerns."""
        source = "prompt_schedule"
        if isinstance(spec, PromptSchedule):
            return spec
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            text = str(spec)
            if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
                if not path.is_file():
                    raise FileNotFoundError(f"prompt_schedule file {path} does not exist")
                text, source = path.read_text(encoding="utf-8"), f"prompt_schedule file {path}"
            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"{source} is not valid YAML: {e}") from e
        if not isinstance(spec, dict) or not spec:
            raise ValueError(f"{source} must be a non-empty mapping of base prompt -> list of "
                             f"{{prompt, from_step, to_step}} segments (or a YAML file of one), got {spec!r}")
        return cls({_text(f"{source}: base prompt", base): _segments(source, base, items, num_steps)
                    for base, items in spec.items()})

    def to_dict(self) -> dict:
        """Plain YAML/JSON-ready data that `load` reads back."""
        return {base: [dict(prompt=s.prompt, from_step=s.from_step, to_step=s.to_step) for s in segs]
                for base, segs in self.segments.items()}

    def check(self, num_steps: int, base_prompts: Optional[Sequence[str]] = None) -> "PromptSchedule":
        """Raise a ValueError naming the segment that gets no step at `num_steps`, or a scheduled base
        prompt that is not among `base_prompts`; returns self."""
        if base_prompts is not None:
            known = set(base_prompts)
            unknown = [base for base in self.segments if base not in known]
            if unknown:
                raise ValueError(f"prompt_schedule names base prompt(s) {unknown} that are not in the prompt "
                                 f"set ({len(known)} prompts, e.g. {sorted(known)[:3]}); a schedule's keys "
                                 "must be prompts of the set, written exactly")
        for base, segs in self.segments.items():
            for s in segs:
                if not s.steps(num_steps):
                    raise ValueError(f"prompt_schedule[{base!r}]: segment {s.prompt!r} [{s.from_step}, "
                                     f"{s.to_step}) gets no step at num_steps={num_steps} (step k takes the "
                                     "segment holding k / num_steps); widen it or raise num_steps")
        return self

    def prompts_at(self, base: str, num_steps: int) -> list[str]:
        """The prompt of each step k = 0 .. T-1 of a sample of `base` (itself when unscheduled)."""
        if base not in self.segments:
            return [base] * num_steps
        out: list[str] = []
        for s in self.segments[base]:
            out += [s.prompt] * len(s.steps(num_steps))
        return out


def _text(what: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _fraction(where: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {key} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: {key}={value} is outside [0, 1]: steps are fractions of the chain "
                         "(0 its first, noisiest step, 1 its end); step k of T starts at k / T")
    return float(value)


def _segments(source: str, base: str, items, num_steps: Optional[int]) -> list[Segment]:
    where = f"{source}[{base!r}]"
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where} must be a non-empty list of {{prompt, from_step, to_step}} segments, "
                         f"got {items!r}")
    segs = []
    for i, item in enumerate(items):
        at = f"{where} segment {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{at} must be a mapping with keys {list(SEGMENT_KEYS)}, got {item!r}")
        unknown, missing = sorted(set(item) - set(SEGMENT_KEYS)), [k for k in SEGMENT_KEYS if k not in item]
        if unknown or missing:
            raise ValueError(f"{at} must have exactly the keys {list(SEGMENT_KEYS)}; unknown: {unknown}, "
                             f"missing: {missing}")
        s = Segment(_text(f"{at}: prompt", item["prompt"]), _fraction(at, "from_step", item["from_step"]),
                    _fraction(at, "to_step", item["to_step"]))
        if not s.from_step < s.to_step:
            raise ValueError(f"{at} ({s.prompt!r}): from_step={s.from_step} must be < to_step={s.to_step}")
        segs.append(s)
    segs.sort(key=lambda s: s.from_step)
    edge = 0.0
    for s in segs:
        if s.from_step > edge:
            raise ValueError(f"{where}: the chain [{edge}, {s.from_step}){_steps_in(edge, s.from_step, num_steps)} "
                             f"is covered by no segment (before {s.prompt!r}); segments must cover [0, 1] "
                             "without gaps")
        if s.from_step < edge:
            raise ValueError(f"{where}: segments overlap on [{s.from_step}, {edge})"
                             f"{_steps_in(s.from_step, edge, num_steps)} (at {s.prompt!r}); each part of the "
                             "chain must have one prompt")
        edge = s.to_step
    if edge < 1.0:
        raise ValueError(f"{where}: the chain [{edge}, 1.0]{_steps_in(edge, 1.0, num_steps)} is covered by no "
                         "segment; the last must end at to_step=1.0")
    return segs


def schedule_value(value, num_steps: Optional[int] = None) -> Optional[dict]:
    """A `prompt_schedule` config value (mapping, YAML text or file path; None, '' or 'none' for no
    schedule) as the plain mapping it holds, so a run records the schedule, not a path to a file."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return PromptSchedule.load(value, num_steps).to_dict()


class PromptSteps:
    """Every distinct text of a prompt list and its schedule, and which one each step uses.

    `texts`: the base prompts in order, then the scheduled prompts not among them (encode each once).
    `step_ids`: (len(prompts), T) int64 index into `texts` of base prompt i at step k; None without
    a schedule (each sample is conditioned on its base prompt, texts[i], at every step).
    """

    def __init__(self, prompts: Sequence[str], schedule=None, num_steps: Optional[int] = None):
        self.texts = list(prompts)  # ids index prompts, so the base prompts keep their positions
        self.step_ids: Optional[torch.Tensor] = None
        self.scheduled = 0  # how many of the prompts the schedule names
        if schedule is None:
            return
        if num_steps is None:
            raise ValueError("a prompt schedule needs num_steps (the steps it is resolved to)")
        schedule = PromptSchedule.load(schedule, num_steps).check(num_steps)
        self.scheduled = sum(base in schedule.segments for base in prompts)
        where: dict[str, int] = {}
        for i, text in enumerate(self.texts):
            where.setdefault(text, i)
        rows = []
        for base in prompts:
            row = []
            for text in schedule.prompts_at(base, num_steps):
                if text not in where:
                    where[text] = len(self.texts)
                    self.texts.append(text)
                row.append(where[text])
            rows.append(row)
        self.step_ids = torch.tensor(rows, dtype=torch.int64)


def step_conditioning(embeddings: torch.Tensor, step_ids: Optional[torch.Tensor], ids: torch.Tensor) -> dict:
    """rollout's conditioning keywords for base prompts `ids` (B,): `embeddings` (len(texts), L, D)
    of `PromptSteps.texts`, and `step_ids` from it.

    Without a schedule: encoder_hidden_states (B, L, D), as before. With one: the embeddings of the
    distinct texts this batch uses (P, L, D) and prompt_index (T, B) into them.
    """
    ids = ids.to(embeddings.device)
    if step_ids is None:
        return dict(encoder_hidden_states=embeddings[ids])
    used, index = torch.unique(step_ids.to(embeddings.device)[ids].T, return_inverse=True)
    return dict(encoder_hidden_states=embeddings[used], prompt_index=index)


class PromptBank:
    """Every text embedding a prompt set needs, each computed once: its prompts' and, with a
    schedule, the scheduled prompts', and the negative prompt's.

    `models` has `encode_prompts(list[str]) -> (n, L, D)` (rlr_fast.models.SDModels).
    """

    def __init__(self, models, prompts: list[str], negative_prompt: str, schedule=None,
                 num_steps: Optional[int] = None, chunk: int = 32):
        self.prompts = prompts
        self.steps = PromptSteps(prompts, schedule, num_steps)
        texts = self.steps.texts
        self.embeddings = torch.cat([models.encode_prompts(texts[i:i + chunk]) for i in range(0, len(texts), chunk)])
        self.negative = models.encode_prompts([negative_prompt])

    def conditioning(self, ids: torch.Tensor) -> dict:
        """rollout's encoder_hidden_states (and prompt_index under a schedule) for prompts `ids`."""
        return step_conditioning(self.embeddings, self.steps.step_ids, ids)

    def batch(self, ids: torch.Tensor, guidance_scale: float) -> dict:
        """rollout's conditioning keywords for prompts `ids`, guidance included."""
        negative = self.negative.expand(len(ids), -1, -1) if guidance_scale != 1.0 else None
        return dict(self.conditioning(ids), negative_encoder_hidden_states=negative, guidance_scale=guidance_scale)
