"""What an evaluation (rlr_fast.evaluation) writes: `rlr-fast evaluate`'s eval.json, eval.md and
side-by-side sample grid, and the curves of finetune's eval_every records (eval_curve.png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw

from .inference import grid_image
from .metrics import jsonable, save_panels
from .run_dir import atomic_write

GRID_NAME = "eval_grid.png"


def estimate(stats: Optional[dict], signed: bool = False) -> str:
    """'mean ± s.e.' (4 and 2 significant digits), '+' on a signed difference; 'n/a' without a value."""
    if stats is None or stats.get("mean") is None:
        return "n/a"
    mean = f"{stats['mean']:+.4g}" if signed else f"{stats['mean']:.4g}"
    return f"{mean} ± {stats['stderr']:.2g}" if stats.get("stderr") is not None else f"{mean} (n = {stats['n']})"


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(measure, base, LoRA, LoRA - base) for every measure of an evaluation result."""
    table = [(f"reward `{name}`", estimate(m["base"]), estimate(m["lora"]), estimate(m["lora_minus_base"], True))
             for name, m in result["rewards"].items()]
    measures = [("diversity, pixels (RMS distance)", result["diversity"]["pixels"])]
    features = result["diversity"]["features"]
    if features is not None:
        measures.append((f"diversity, `{features['model']}` features (unit embeddings)", features))
    table += [(what, estimate(m["base"]), estimate(m["lora"]), estimate(m["lora_minus_base"], True))
              for what, m in measures]
    table.append(("KL(LoRA ‖ base) along the chain, nats", "0", estimate(result["kl"]["lora"]), ""))
    return table


def table(result: dict) -> str:
    """The measures of an evaluation result as a markdown table."""
    return "\n".join(["| measure | base | LoRA | LoRA − base |", "|---|---:|---:|---:|",
                      *(f"| {' | '.join(row)} |" for row in rows(result))])


def markdown(report: dict) -> str:
    """eval.md: the table of `rows`, what each row measures, the grid and the prompts."""
    s = report["settings"]
    held = {True: ", held out from the training prompts", False: ", the training prompts themselves",
            None: ""}[s["held_out"]]
    lines = [
        f"# Evaluation of the LoRA `{s['lora']}` against its base model `{s['model']}`", "",
        f"{s['date']}; {len(report['prompts'])} prompts (`{s['prompts']}`{held}) x {len(report['seeds'])} seeds "
        f"({', '.join(map(str, report['seeds']))}) = {report['samples']} samples per sampler; {s['num_steps']} DDIM "
        f"steps, eta {s['eta']}, guidance {s['guidance_scale']}, {s['dtype']} on {s['device']}, {s['batch_size']} "
        f"prompts per batch; {s['seconds']:.0f} s. For each prompt and seed both samplers start from the same x_T "
        "and draw the same step noises. Values: mean ± standard error.", "",
        table(report), "",
        "- Rewards: over the prompt x seed samples; LoRA − base is paired by prompt and seed.",
        "- Diversity: the mean pairwise distance between the samples of one prompt (its seeds), averaged over the "
        "prompts (± s.e. over prompts); pixels in [0, 1], embeddings normalised to unit length (0 identical, "
        "1.41 orthogonal). A LoRA that raises its reward by collapsing onto one image per prompt lowers it.",
        "- KL: per LoRA chain, the sum over steps of ||μ_LoRA(x_k) − μ_base(x_k)||² / (2σ_k²) at the chain's own "
        "states x_k, whose mean over chains is the KL between the two samplers' path measures (the joint laws of "
        "x_T … x_0): how far the fine-tuned sampler has moved from the base one."
        + (f" Deterministic steps left out: {report['kl']['deterministic_steps']}."
           if report["kl"].get("deterministic_steps") else "")
        + (f" Not available: {report['kl']['reason']}." if report["kl"].get("reason") else ""), "",
        f"![base (left) and LoRA (right)]({GRID_NAME})", "",
        f"`{GRID_NAME}`: the first {s['grid_prompts']} prompts (rows) x the first {s['grid_seeds']} seeds (columns), "
        "the base model's samples on the left, the LoRA's on the right.", "",
        "## Prompts", "", *(f"{i}. {p}" for i, p in enumerate(report["prompts"], 1)), "",
    ]
    return "\n".join(lines)


def side_by_side(base: torch.Tensor, lora: torch.Tensor, path: Path, gap: int = 16) -> Path:
    """Grids of base and LoRA images (prompts, seeds, 3, H, W) side by side, labelled, as one PNG."""
    left, right = (grid_image(images.flatten(0, 1), rows=images.shape[0]) for images in (base, lora))
    header = 18
    canvas = Image.new("RGB", (left.width + gap + right.width, header + max(left.height, right.height)), "white")
    canvas.paste(left, (0, header))
    canvas.paste(right, (left.width + gap, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), "base", fill="black")
    draw.text((left.width + gap + 4, 3), "LoRA", fill="black")
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def write_report(report: dict, grids: tuple[torch.Tensor, torch.Tensor], out: Path) -> dict[str, Path]:
    """eval.json, eval.md and the grid in `out` (created; earlier ones replaced); their paths."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(jsonable(report), indent=2)
    paths = {"json": atomic_write(out / "eval.json", lambda tmp: tmp.write_text(text + "\n", encoding="utf-8")),
             "markdown": atomic_write(out / "eval.md", lambda tmp: tmp.write_text(markdown(report),
                                                                                  encoding="utf-8")),
             "grid": side_by_side(*grids, out / GRID_NAME)}
    return paths


def draw_eval_curves(records: list[dict], path: Path, width: int = 720, panel_height: int = 210) -> Path:
    """One panel per measure of eval_every records: the LoRA's mean ± s.e. (dots and bars) per
    evaluated step, the base model's value as a dashed line; the KL last."""
    def panel(title: str, pick) -> dict:
        points = [(r["step"], pick(r)) for r in records if pick(r) and pick(r).get("mean") is not None]
        return dict(title=title, steps=[s for s, _ in points], means=[v["mean"] for _, v in points],
                    spreads=[v["stderr"] or 0.0 for _, v in points])

    def measure(title: str, pick) -> dict:
        chart = panel(title + ": LoRA mean ± s.e. (dots, bars), base (dashed)", lambda r: (pick(r) or {}).get("lora"))
        base = next((pick(r)["base"]["mean"] for r in reversed(records) if pick(r)), None)
        return {**chart, "reference": (base, "base") if base is not None else None}

    last = records[-1] if records else {"rewards": {}, "diversity": {"features": None}}
    panels = [measure(f"reward {name}", lambda r, n=name: r["rewards"].get(n)) for name in last["rewards"]]
    panels.append(measure("diversity, pixels", lambda r: r["diversity"]["pixels"]))
    if last["diversity"]["features"] is not None:
        panels.append(measure(f"diversity, {last['diversity']['features']['model']} features",
                              lambda r: r["diversity"]["features"]))
    panels.append(panel("KL(LoRA || base) along the chain, nats: mean ± s.e.", lambda r: r["kl"]["lora"]))
    return save_panels(panels, path, (width, panel_height * len(panels)))
