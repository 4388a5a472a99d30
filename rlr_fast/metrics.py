"""What a run reports: metrics.jsonl (one JSON object per optimizer step, mirrored to TensorBoard),
the run's summary, its reward curve, and the peak memory of a step."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .run_dir import atomic_write, writing


def _read_records(path: Path) -> tuple[list[dict], Optional[int], Optional[str]]:
    """The records of a JSON-lines file; the number of its last line when that one is torn (a write
    cut short); and what is wrong with the first unreadable line before it, if one is."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                return records, number, None
            return records, None, f"{path} line {number} is not JSON ({e})"
    return records, None, None


def read_metrics(path: Path, keep_until: int) -> list[dict]:
    """The records of metrics.jsonl up to step `keep_until` (a resumed run's checkpoint).

    A torn last line (a write cut short by a kill) is dropped with a note: it comes after the last
    checkpoint anyway. Any other unreadable line is a ValueError naming the file and the line.
    """
    if not path.exists():
        return []
    records, torn, bad = _read_records(path)
    if bad:
        raise ValueError(f"{bad}; remove or repair that line to resume")
    if torn:
        print(f"dropped the torn last line of {path} (line {torn}, a write cut short)", file=sys.stderr)
    return [r for r in records if r.get("step", math.inf) <= keep_until]


def _lines(records: list[dict]) -> list[str]:
    return [json.dumps(r) for r in records]


def resume_records(path: Path, step: int, saved: Optional[list[dict]], source: Path) -> tuple[list[dict], bool]:
    """metrics.jsonl's records up to `step` (the resumed checkpoint's), and whether the file must be
    written again. `saved` is the checkpoint `source`'s copy of them (None: it holds none). A missing
    file, a damaged line among those records or records that differ from the checkpoint's are said
    on stderr in one line, and rebuilt from `saved` when there is one."""
    if saved is None:
        if not path.exists() and step:
            print(f"note: {path} is missing and {source.name} holds no copy of its records: the log restarts at "
                  f"step {step + 1}", file=sys.stderr)
        return read_metrics(path, step), False
    if not path.exists():
        problem = f"{path} is missing"
    else:
        records, torn, bad = _read_records(path)
        kept = [r for r in records if r.get("step", math.inf) <= step]
        if not bad and _lines(kept) == _lines(saved):
            if torn:
                print(f"dropped the torn last line of {path} (line {torn}, a write cut short)", file=sys.stderr)
            return saved, False
        problem = bad or (f"the last line of {path} is torn (line {torn})" if torn and len(kept) < len(saved) else
                          f"{path} differs from the records of steps 1-{step} kept with the checkpoint")
    print(f"{problem}: rebuilt its {len(saved)} records up to step {step} from {source}", file=sys.stderr)
    return saved, True


class MetricsLog:
    """metrics.jsonl (one object per step) plus TensorBoard scalars when it is installed.

    Starts the file with `records` (a resumed run's earlier steps) or empty. With `write=False`
    (the ranks of a data-parallel run but rank 0) it only keeps the records.
    """

    def __init__(self, out: Path, records: list[dict], tensorboard: bool, write: bool = True):
        self.path = out / "metrics.jsonl"
        self.records = list(records)
        self.write_files = write
        if write:
            atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records),
                                                                encoding="utf-8"))
        self.writer = None
        if tensorboard and write:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not self.write_files:
            return
        with writing(self.path), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def jsonable(value):
    """`value` with tensors and numpy scalars as Python numbers and NaN/Inf as None (JSON has neither)."""
    if torch.is_tensor(value) or isinstance(value, np.generic):
        return value.tolist() if getattr(value, "ndim", 0) else value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def diversity(images: torch.Tensor, prompt_ids: torch.Tensor) -> Optional[float]:
    """The mean pairwise RMS distance between images (B, ...) in [0, 1] of the same prompt,
    averaged over the prompts with at least two; None when no prompt has two."""
    flat = images.detach().double().flatten(1)
    per_prompt = []
    for prompt in torch.unique(torch.as_tensor(prompt_ids)):
        group = flat[torch.as_tensor(prompt_ids).to(flat.device) == prompt]
        if len(group) >= 2:
            per_prompt.append(torch.pdist(group).mean() / math.sqrt(flat.shape[1]))
    return float(torch.stack(per_prompt).mean()) if per_prompt else None


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    """This step's peak GPU memory allocated, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak * (1 if sys.platform == "darwin" else 1024))  # bytes on macOS, KiB on Linux


def summarize(records: list[dict], seconds: float) -> dict:
    """Final numbers: the last step's metrics, and the mean reward of the first and last fifth of
    the steps with the standard error of their difference (step means as the samples)."""
    ok = [r for r in records if r.get("reward_mean") is not None]
    summary = {"steps": len(records), "seconds": seconds,
               "nonfinite_skipped": sum(1 for r in records if r.get("skipped"))}
    if records:
        summary["last"] = records[-1]
    if len(ok) >= 10:
        fifth = len(ok) // 5
        first = np.array([r["reward_mean"] for r in ok[:fifth]])
        last = np.array([r["reward_mean"] for r in ok[-fifth:]])
        stderr = math.sqrt(first.var(ddof=1) / fifth + last.var(ddof=1) / fifth)
        summary.update(reward_first_fifth=float(first.mean()), reward_last_fifth=float(last.mean()),
                       reward_gain=float(last.mean() - first.mean()), reward_gain_stderr=stderr)
    return summary


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, steps: list, means: list,
               spreads: Optional[list] = None, *, line: Optional[list] = None,
               reference: Optional[tuple[float, str]] = None) -> None:
    """One chart in `box` (left, top, right, bottom) of the frame: a dot per (step, mean), a bar of
    +- spread, optionally a line through `line` (a value per step) and a dashed horizontal line at a
    labelled `reference` value; the value range is labelled on the left, the first and last step below."""
    left, top, right, bottom = box
    spreads = spreads or [0.0] * len(means)
    if steps:
        ends = [m + s for m, s in zip(means, spreads)] + [m - s for m, s in zip(means, spreads)]
        ends += [reference[0]] if reference is not None else []
        low, high = min(ends), max(ends)
        if high - low < 1e-12:
            low, high = low - 1, high + 1
        x_lo, x_hi = min(steps), max(max(steps), min(steps) + 1)

        def xy(step, value):
            return (left + (step - x_lo) / (x_hi - x_lo) * (right - left),
                    top + (high - value) / (high - low) * (bottom - top))

        if reference is not None:
            y = xy(x_lo, reference[0])[1]
            for x in range(left, right, 12):
                draw.line([(x, y), (min(x + 6, right), y)], fill=(120, 120, 120))
            draw.text((right - 8 * len(reference[1]) - 4, y - 13), reference[1], fill=(100, 100, 100))
        for step, m, s in zip(steps, means, spreads):
            if s:
                draw.line([xy(step, m - s), xy(step, m + s)], fill=(200, 210, 235) if line else (60, 90, 200))
        for step, m in zip(steps, means):
            x, y = xy(step, m)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(60, 90, 200))
        if line is not None:
            draw.line([xy(s, v) for s, v in zip(steps, line)], fill=(220, 60, 40), width=2)
        for value in (low, (low + high) / 2, high):
            draw.text((4, xy(x_lo, value)[1] - 6), f"{value:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {x_lo}", fill="black")
        draw.text((right - 70, bottom + 8), f"step {x_hi}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, top - 22), title, fill="black")


def save_panels(panels: list[dict], path: Path, size: tuple[int, int]) -> Path:
    """`draw_panel(**panel)` for each panel, stacked top to bottom in one PNG of `size`."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    share = height // max(1, len(panels))
    for i, panel in enumerate(panels):
        draw_panel(draw, (70, i * share + 30, width - 20, (i + 1) * share - 45), **panel)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def draw_reward_curve(records: list[dict], path: Path, size: tuple[int, int] = (720, 400)) -> Path:
    """The reward of each step's records: mean (dots), +- one std across the batch (bars), and a
    moving average (line), as a PNG drawn with PIL."""
    ok = [r for r in records if r.get("reward_mean") is not None]
    means = [r["reward_mean"] for r in ok]
    window = max(1, len(means) // 10)
    smooth = [float(np.mean(means[max(0, i - window + 1):i + 1])) for i in range(len(means))]
    return save_panels([dict(title=f"reward per step: batch mean (dots), +-1 std (bars), moving average of {window} "
                                   "(line)", steps=[r["step"] for r in ok], means=means,
                             spreads=[r["reward_std"] for r in ok], line=smooth)], path, size)
