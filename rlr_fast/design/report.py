"""A design's report: the markdown tables and the PNG of per-step variances (drawn with PIL)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..run_dir import atomic_write

VARIANCE_MODEL = (
    "Variance model (docs/estimator.md §13): every design's estimate is a sum of recorded per-step shares of the "
    "sweeps, so its trace variance over the pilot batches is measured directly, with the finite-population term "
    "m^2 (1/k - 1/m) S^2 of subsampling k of the m likelihood-ratio steps added given each chain; j drawn from q "
    "has variance sum_j q(j) V_j because every j has the same mean. Cost: UNet forward-equivalents of the batch "
    "(rollout T, {step:g} per recomputed step{checkpoint}) plus reward evaluations ({reward:g} each, {rbwd:g} more "
    "for dR/dx_0). The choice minimises variance x cost.")


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _candidate_row(rank, c, best: float) -> str:
    memory = "-" if c.memory_gib is None else f"{c.memory_gib:.2f}"
    return (f"| {rank} | {c.label()} | {_num(c.variance)} | {_num(c.variance_se)} | {c.unet_cost:.4g} | "
            f"{c.reward_cost:.3g} | {c.cost:.4g} | {_num(c.efficiency)} | {c.efficiency / best:.3g} | {memory} |")


def _distinct(candidates) -> list:
    """The candidates without repeats of one estimator: with h = 1 and no subsampling every j gives the same
    estimate (the H-term is then step j+1's likelihood ratio, which C would carry anyway)."""
    seen, out = set(), []
    for c in candidates:
        same = (c.family, c.zo_steps, f"{c.variance:.9e}", c.cost)  # equal up to the summation order
        if same not in seen:
            seen.add(same)
            out.append(c)
    return out


def _references(d) -> list:
    """The named points of the space, where they were scored: full_bp, zo with every step, the spec's rlr."""
    def wanted(c) -> bool:
        f = c.family
        return (f.method == "full_bp" or (f.method == "zo" and c.zo_steps is None)
                or (f.method == "rlr" and (f.f, f.h, c.j, c.zo_steps) == (1, 2, "uniform", None)))

    return [c for c in d.candidates if wanted(c)]


def markdown(d, top: int = 12) -> str:
    c, cost = d.chosen, d.pilot_cost
    checkpoint = f" + {d.costs.checkpoint:g} with checkpoint_unet" if c.options.checkpoint_unet else ""
    lines = [
        "# Estimator design", "",
        f"**Chosen: {c.label()}** (method={c.options.method}, first_order_steps={c.options.first_order_steps}, "
        f"h={c.options.h}, j={c.options.j!r}, zo_steps={c.options.zo_steps}, baseline={c.options.baseline!r}): "
        f"trace variance {_num(c.variance)} +- {_num(c.variance_se)}, cost {c.cost:.4g} forward-equivalents per "
        f"update, variance x cost {_num(c.efficiency)}.", "",
        f"Pilots: {d.num_pilots} batches of {d.batch_size}, T = {d.num_steps}; baselines {list(d.baselines)}; "
        f"sub-chains up to h = {d.max_h}; gradients {d.sketch}. Budget: "
        f"{'none' if d.budget is None else f'{d.budget:g} forward-equivalents'} per update, memory "
        f"{'not planned' if d.max_memory_gb is None else f'{d.max_memory_gb:g} GiB'}. The design call cost "
        f"{cost['forward_equivalents']:.4g} forward-equivalents ({cost['rollout_forward_equivalents']} in rollouts, "
        f"{cost['recomputed_steps']} recomputed steps, {cost['reward_forward']} reward evaluations, "
        f"{cost['reward_backward']} reward gradients) in {cost['seconds']:.3g} s.", "",
        VARIANCE_MODEL.format(step=d.costs.step, checkpoint=checkpoint, reward=d.costs.reward,
                              rbwd=d.costs.reward_backward), "",
        "## Per-step trace variance", "",
        "Step t (t = 1 draws x_0): the variance of its pathwise share and of its likelihood ratio, per baseline.", "",
        "| t | sigma_t | pathwise | " + " | ".join(f"likelihood ratio ({b})" for b in d.baselines) + " |",
        "|---" * (3 + len(d.baselines)) + "|",
    ]
    pathwise, ratio = d.variances["pathwise"], d.variances["likelihood ratio"]
    for t in range(1, d.num_steps + 1):
        lines.append(f"| {t} | {d.sigmas[t - 1]:.4g} | {_num(None if pathwise is None else float(pathwise[t - 1]))} | "
                     + " | ".join(_num(float(ratio[b][t - 1])) for b in d.baselines) + " |")
    lines += ["", "## Half-order term by h", "",
              "The H-term's variance over the valid j: its mean (what j uniform has) and its least, with that j.", "",
              "| h | " + " | ".join(f"mean ({b}) | least ({b}) | at j" for b in d.baselines) + " |",
              "|---" * (1 + 3 * len(d.baselines)) + "|"]
    for h in range(1, d.max_h + 1):
        cells = []
        for b in d.baselines:
            row = d.variances["half"][b][h - 1]
            finite = [(float(v), j) for j, v in enumerate(row.tolist()) if not math.isnan(v)]
            if finite:
                least = min(finite)
                cells += [_num(sum(v for v, _ in finite) / len(finite)), _num(least[0]), str(least[1])]
            else:
                cells += ["-", "-", "-"]
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    best = c.efficiency
    header = ["| rank | design | variance | s.e. | UNet fwd-eq | reward fwd-eq | cost | variance x cost | "
              "x chosen | memory GiB |", "|---" * 10 + "|"]
    distinct = _distinct(d.candidates)
    lines += ["", f"## Candidates ({len(d.candidates)} scored: per family and j, the best k within the budget; "
                  f"{len(distinct)} distinct estimators)", "",
              *header, *(_candidate_row(i + 1, x, best) for i, x in enumerate(distinct[:top]))]
    rank = {id(x): i + 1 for i, x in enumerate(distinct)}
    refs = [x for x in _references(d) if rank.get(id(x), 0) > top]
    if refs:
        lines += ["", "Reference points of the space (full_bp, zo with every step, rlr f=1 h=2 j uniform):", "",
                  *header, *(_candidate_row(rank[id(x)], x, best) for x in refs)]
    if d.memory:
        lines += ["", f"Memory plan of the chosen design ({d.max_memory_gb:g} GiB): "
                  + ", ".join(f"{k}={v}" for k, v in d.memory.items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The PNG

COLORS = [(40, 70, 200), (220, 60, 40), (240, 150, 30), (150, 60, 170), (40, 160, 90), (110, 190, 60),
          (30, 170, 180), (120, 120, 120)]


def _series(d) -> list[tuple[str, list[float]]]:
    """(label, variance per t = 1..T) of each line: pathwise, likelihood ratio per baseline, and the
    H-term of the chosen baseline by h, placed at its closing step t = j + 1."""
    out = []
    if d.variances["pathwise"] is not None:
        out.append(("pathwise", [float(v) for v in d.variances["pathwise"]]))
    out += [(f"likelihood ratio ({b})", [float(v) for v in d.variances["likelihood ratio"][b]]) for b in d.baselines]
    b = d.chosen.family.baseline if d.chosen.family.baseline is not None else d.baselines[0]
    out += [(f"H-term h={h} ({b}), at t = j+1", [float(v) for v in d.variances["half"][b][h - 1]])
            for h in range(2, d.max_h + 1)]
    return out


def plot(d, path: Path, size: tuple[int, int] = (900, 520)) -> Path:
    """Per-step trace variances on a log scale against the step t."""
    series = _series(d)
    values = [v for _, ys in series for v in ys if v > 0 and math.isfinite(v)]
    width, height = size
    left, right, top, bottom = 80, 20, 40 + 16 * len(series), 45
    image = Image.new("RGB", (width, height + 16 * len(series)), "white")
    height += 16 * len(series)
    draw = ImageDraw.Draw(image)
    T = d.num_steps
    lo, hi = (math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))) if values else (0, 1)
    hi = max(hi, lo + 1)

    def xy(t: float, v: float) -> tuple[float, float]:
        x = left + (t - 1) / max(T - 1, 1) * (width - left - right)
        y = top + (hi - math.log10(v)) / (hi - lo) * (height - top - bottom)
        return x, y

    for e in range(lo, hi + 1):
        y = xy(1, 10.0 ** e)[1]
        draw.line([(left, y), (width - right, y)], fill=(230, 230, 230))
        draw.text((6, y - 6), f"1e{e}", fill="black")
    for t in sorted({1, T, *range(1, T + 1, max(1, T // 10))}):
        x = xy(t, 10.0 ** lo)[0]
        draw.text((x - 6, height - bottom + 8), str(t), fill="black")
    for i, (label, ys) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = [xy(t, v) if v > 0 and math.isfinite(v) else None for t, v in enumerate(ys, 1)]
        for a, b in zip(points, points[1:]):
            if a is not None and b is not None:
                draw.line([a, b], fill=color, width=2)
        for p in points:
            if p is not None:
                draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        draw.line([(left, 30 + 16 * i), (left + 24, 30 + 16 * i)], fill=color, width=3)
        draw.text((left + 30, 24 + 16 * i), label, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 6), f"trace variance per step over {d.num_pilots} pilot batches (log scale); step t "
                         f"(t = 1 draws x_0), T = {T}; chosen: {d.chosen.label()}", fill="black")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
