"""Procedural captioned images ("a red circle on a blue background") for the embedded default model.

The default model is trained on these images, the demo fine-tunes it on `PROMPTS`, and rewards
and tests read a prompt back with `parse_prompt`. Drawing is numpy only: every shape is an
analytic mask sampled on a 4x finer grid and averaged down, which anti-aliases the edges.
"""

from __future__ import annotations

import re

import numpy as np

# Far apart in RGB so that "nearest named colour" is an unambiguous measurement of a pixel.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Each colour names the shape twice and a background twice; the three shapes take turns.
PROMPTS: list[str] = [
    "a red circle on a blue background",
    "a red square on a white background",
    "a green triangle on a black background",
    "a green circle on a yellow background",
    "a blue square on an orange background",
    "a blue triangle on a white background",
    "a yellow circle on a purple background",
    "a yellow square on a green background",
    "a white triangle on a red background",
    "a white circle on a black background",
    "a black square on a yellow background",
    "a black triangle on an orange background",
    "a purple circle on a green background",
    "a purple square on a red background",
    "an orange triangle on a blue background",
    "an orange circle on a purple background",
]



def held_out_prompts(training: tuple[str, ...] = tuple(PROMPTS)) -> list[str]:
    """Evaluation prompts that share no (colour, shape) and no (colour, background) pair with `training`:
    each shape colour of `training` in COLORS order with the shape it never has there, on each of the
    first two other colours (cyclically after it in COLORS) it is never drawn on there. For `PROMPTS`:
    16 prompts asking for combinations the demo never fine-tunes on (the embedded model itself was
    trained on random combinations of every colour and shape, `make_dataset`)."""
    parsed = [parse_prompt(p) for p in training]
    names = list(COLORS)
    prompts = []
    for i, color in enumerate(names):
        own = [p for p in parsed if p["color"] == color]
        missing = [shape for shape in SHAPES if shape not in {p["shape"] for p in own}]
        if not own or not missing:
            continue
        backgrounds = [c for c in names[i + 1:] + names[:i] if c not in {p["background"] for p in own}][:2]
        prompts += [caption(color, missing[0], background) for background in backgrounds]
    return prompts


_SUPERSAMPLE = 4


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(color: str, shape: str, background: str) -> str:
    """The caption of an image, e.g. "a red circle on an orange background"."""
    return f"{_article(color)} {color} {shape} on {_article(background)} {background} background"


def _shape_coverage(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Fraction (0..1) of each pixel covered by the shape centred at (cx, cy) with radius r (pixels)."""
    fine = size * _SUPERSAMPLE
    # centres of the fine sub-pixels, in pixel units
    coords = (np.arange(fine) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        # half side 0.8 r: about the circle's area, so no shape is systematically bigger
        half = 0.8 * r
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        # equilateral, pointing up, side 2 r (0.55 of the circle's area), its height centred on cy
        height = r * np.sqrt(3)
        top_y, base_y = cy - height / 2, cy + height / 2
        half_width = (y - top_y) / height * r
        inside = (y >= top_y) & (y <= base_y) & (np.abs(x - cx) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def draw(color: str, shape: str, background: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A (size, size, 3) uint8 image of one shape on a plain background."""
    coverage = _shape_coverage(shape, size, cx, cy, r)[..., None]
    fg = np.asarray(COLORS[color], dtype=np.float64)
    bg = np.asarray(COLORS[background], dtype=np.float64)
    return np.rint(bg * (1 - coverage) + fg * coverage).astype(np.uint8)


def make_example(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """One random image and its caption: a shape of one colour on a background of another.

    The shape's centre stays within the middle 30% of the image and its radius is 18-28% of the
    size, so it stays near the middle and clear of the outer 2 pixels (`measure_colors`).
    """
    names = list(COLORS)
    color, background = rng.choice(names, size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    cx, cy = size * rng.uniform(0.35, 0.65, size=2)
    r = size * rng.uniform(0.18, 0.28)
    return draw(str(color), shape, str(background), size, cx, cy, r), caption(color, shape, background)


def make_dataset(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """`n` examples from one seeded generator: uint8 images (n, size, size, 3) and their captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        images[i], text = make_example(rng, size)
        captions.append(text)
    return images, captions


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The shape colour, shape and background colour a prompt names (None where it names none).

    Case-insensitive and word-based, so it reads "A Red circle", "red circle on blue background"
    and "a red circle" (background None) alike. The background is the last colour named before
    the word "background"; the shape colour is the first other colour.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    colors = [(i, w) for i, w in enumerate(words) if w in COLORS]
    background_at = words.index("background") if "background" in words else None
    background_index, background = None, None
    if background_at is not None:
        before = [(i, w) for i, w in colors if i < background_at]
        if before:
            background_index, background = before[-1]
    color = next((w for i, w in colors if i != background_index), None)
    shape = next((w for w in words if w in SHAPES), None)
    return {"color": color, "shape": shape, "background": background}


def nearest_color_names(image: np.ndarray) -> np.ndarray:
    """The name of the nearest colour in `COLORS` (RGB distance) of every pixel, shape (H, W)."""
    names = np.array(list(COLORS))
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    distances = ((image[..., None, :].astype(np.float64) - palette) ** 2).sum(-1)
    return names[distances.argmin(-1)]


def measure_colors(image: np.ndarray, border: int = 2) -> dict[str, str | None]:
    """Read the shape and background colour off an image (H, W, 3) uint8.

    Background: the most common colour of the outer `border` pixels (shapes stay clear of the
    frame, see `make_example`). Shape: the most common other colour (None if every pixel is background). Majority
    votes over nearest named colours, so stray pixels of a generated image do not decide.
    """
    names = nearest_color_names(image)
    frame = np.ones(names.shape, dtype=bool)
    frame[border:-border, border:-border] = False
    values, counts = np.unique(names[frame], return_counts=True)
    background = str(values[counts.argmax()])
    rest = names[names != background]
    if rest.size == 0:
        return {"color": None, "background": background}
    values, counts = np.unique(rest, return_counts=True)
    return {"color": str(values[counts.argmax()]), "background": background}
