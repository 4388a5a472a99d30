"""Line charts with standard-error bands, side by side, drawn with PIL (the project has no matplotlib).

    draw_panels(path, [Panel(title, x_label, y_label, [Series(label, x, y, se), ...]), ...])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

# Distinguishable on white, in the order labels first appear; the second ten are darker or lighter kin of the first.
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 110), (120, 0, 0),
           (0, 90, 0), (75, 0, 130), (170, 85, 0), (70, 40, 30), (200, 0, 140), (40, 40, 40), (110, 110, 0),
           (0, 110, 120)]


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    se: Sequence[float] = ()  # a band of +-se around y when given


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values spanning [low, high]."""
    span = high - low
    raw = span / max(count - 1, 1)
    step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step *= next((m for m in (1, 2, 5, 10) if step * m >= raw), 10)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _finite(s: Series) -> Series:
    """The points of `s` whose x, y (and se) are finite: a curve that stops early (a run that spent less, a
    method that never reached a grid point) is drawn as far as it goes."""
    se = list(s.se) if len(s.se) else [0.0] * len(s.x)
    kept = [(x, y, e) for x, y, e in zip(s.x, s.y, se) if all(math.isfinite(float(v)) for v in (x, y, e))]
    return Series(s.label, [p[0] for p in kept], [p[1] for p in kept], [p[2] for p in kept] if len(s.se) else ())


def _draw_panel(image: Image.Image, box: tuple[int, int, int, int], panel: Panel, colours: dict) -> None:
    left, top, right, bottom = box
    draw = ImageDraw.Draw(image, "RGBA")
    panel = Panel(panel.title, panel.x_label, panel.y_label, [_finite(s) for s in panel.series])
    xs = [v for s in panel.series for v in s.x]
    ys = [v for s in panel.series for i, y in enumerate(s.y)
          for v in ((y - s.se[i], y + s.se[i]) if len(s.se) else (y,))]
    if not xs:
        return
    x_lo, x_hi = min(0.0, min(xs)), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    pad = 0.05 * (y_hi - y_lo or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for value in _ticks(y_lo, y_hi):
        _, y = at(x_lo, value)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((left - 6, y), _label(value), fill="black", anchor="rm")
    for value in _ticks(x_lo, x_hi):
        x, _ = at(value, y_lo)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), _label(value), fill="black", anchor="mt")
    for s in panel.series:
        colour = colours[s.label]
        if len(s.x) < 2:
            continue
        if len(s.se):
            upper = [at(x, y + e) for x, y, e in zip(s.x, s.y, s.se)]
            lower = [at(x, y - e) for x, y, e in zip(s.x, s.y, s.se)]
            draw.polygon(upper + lower[::-1], fill=colour + (45,))
        draw.line([at(x, y) for x, y in zip(s.x, s.y)], fill=colour + (255,), width=2)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, top - 8), panel.title, fill="black", anchor="md")
    draw.text(((left + right) / 2, bottom + 24), panel.x_label, fill="black", anchor="mt")
    draw.text((left, top - 22), panel.y_label, fill="black", anchor="ld")


def draw_panels(path: Path, panels: list[Panel], title: str = "", panel_size: tuple[int, int] = (430, 330)) -> Path:
    """The panels in one row above a shared legend (every panel's labels, one colour per label), as a PNG."""
    width, height = panel_size
    labels = list(dict.fromkeys(s.label for panel in panels for s in panel.series))
    colours = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}
    legend_rows = math.ceil(len(labels) / 4)
    margin_left, margin_top, margin_bottom = 70, 60, 50
    image = Image.new("RGB", (len(panels) * (width + margin_left) + 20,
                              margin_top + height + margin_bottom + 18 * legend_rows + 20), "white")
    for i, panel in enumerate(panels):
        left = margin_left + i * (width + margin_left)
        _draw_panel(image, (left, margin_top, left + width, margin_top + height), panel, colours)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    y0 = margin_top + height + margin_bottom
    for i, label in enumerate(labels):
        x, y = margin_left + (i % 4) * 260, y0 + 18 * (i // 4)
        draw.line([(x, y + 6), (x + 24, y + 6)], fill=colours[label], width=3)
        draw.text((x + 30, y), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
