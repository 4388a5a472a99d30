"""bench/plotting.py: a curve that stops early (NaN past its last point) is drawn as far as it goes, with no
coordinate outside the panel (a NaN used to turn its band into a triangle across the whole figure)."""

import math

from PIL import ImageDraw

from bench import plotting


def test_a_curve_that_stops_early_stays_inside_its_panel(tmp_path, monkeypatch):
    drawn = []
    for name in ("polygon", "line"):
        original = getattr(ImageDraw.ImageDraw, name)
        monkeypatch.setattr(ImageDraw.ImageDraw, name,
                            lambda self, xy, *a, _o=original, **k: drawn.append(list(xy)) or _o(self, xy, *a, **k))
    nan = float("nan")
    series = [plotting.Series("full", [0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0], [0.1] * 4),
              plotting.Series("stops", [0, 1, 2, 3], [0.5, 1.5, nan, nan], [0.1, 0.1, nan, nan])]
    plotting.draw_panels(tmp_path / "p.png", [plotting.Panel("t", "x", "y", series)], panel_size=(200, 150))
    points = [p for xy in drawn for p in xy if isinstance(p, tuple)]
    assert points and all(math.isfinite(v) for p in points for v in p)
    assert (tmp_path / "p.png").stat().st_size > 0


def test_every_panels_labels_are_in_the_legend_with_one_colour_each(tmp_path, monkeypatch):
    """Two tracks' panels hold different methods: a label of the second panel only is in the legend, and a label
    in both panels is drawn in the same colour in each (the legend used to list the first panel's labels only)."""
    lines = []
    original = ImageDraw.ImageDraw.line
    monkeypatch.setattr(ImageDraw.ImageDraw, "line",
                        lambda self, xy, *a, **k: lines.append(k.get("fill")) or original(self, xy, *a, **k))
    shared = plotting.Series("shared", [0, 1], [0.0, 1.0])
    panels = [plotting.Panel("one", "x", "y", [shared]),
              plotting.Panel("two", "x", "y", [plotting.Series("second only", [0, 1], [1.0, 0.0]), shared])]
    plotting.draw_panels(tmp_path / "p.png", panels, panel_size=(200, 150))
    first, second = (c + (255,) for c in plotting.COLOURS[:2])
    assert lines.count(first) == 2 and lines.count(second) == 1  # "shared" in both panels, "second only" once
    assert plotting.COLOURS[1] in lines  # ... and both in the legend
