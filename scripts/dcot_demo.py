"""The diffusive chain of thought on the embedded model: does the colour of a late (fine) prompt win?

For each demo prompt "a C S on a B background" (the coarse prompt) the fine prompt names another
shape colour C': "a C' S on a B background" (C' the next colour of demo_data.COLORS that is neither
C nor B). A schedule conditions the first fraction s of the steps on the coarse prompt and the rest
on the fine one (s = 0: the fine prompt alone; s = 1: the coarse one alone). `measure_colors` reads
each sample's shape colour; the table gives, per s, the share of samples whose shape has the fine
colour, the coarse colour, or another, with its standard error.

    python scripts/dcot_demo.py --grid docs/dcot_samples.png --json docs/dcot_colors.json

Two samplers: the model's own (T = 20, eta = 0, guidance 4: rlr_fast.default_model.sample) and the
demo preset's (T = 10, eta = 1, no guidance: what `finetune --preset demo` samples and trains with).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from rlr_fast.default_model import load_default
from rlr_fast.demo_data import COLORS, PROMPTS, caption, measure_colors, parse_prompt
from rlr_fast.inference import generate_images, prompt_rows, save_grid
from rlr_fast.prompts import PromptBank

SAMPLERS = {"model (T=20, eta=0, guidance 4)": dict(num_steps=20, eta=0.0, guidance_scale=4.0),
            "demo preset (T=10, eta=1, no guidance)": dict(num_steps=10, eta=1.0, guidance_scale=1.0)}
SWITCHES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def fine_prompt(coarse: str) -> tuple[str, str, str]:
    """(fine prompt, coarse colour, fine colour)."""
    parts = parse_prompt(coarse)
    names = list(COLORS)
    start = names.index(parts["color"])
    fine = next(c for c in names[start + 1:] + names[:start] if c not in (parts["color"], parts["background"]))
    return caption(fine, parts["shape"], parts["background"]), parts["color"], fine


def schedule(switch: float, prompts: list[str]) -> dict:
    """Coarse prompt for steps k / T < switch, the fine one after."""
    segments = {}
    for coarse in prompts:
        fine = fine_prompt(coarse)[0]
        parts = ([{"prompt": coarse, "from_step": 0.0, "to_step": switch}] if switch > 0 else []) + \
                ([{"prompt": fine, "from_step": switch, "to_step": 1.0}] if switch < 1 else [])
        segments[coarse] = parts
    return segments


def images_under(models, switch: float, seeds, sampler: dict, prompts: list[str] = PROMPTS) -> torch.Tensor:
    """(len(prompts) * len(seeds), 3, H, W) prompt-major, every prompt under the schedule of `switch`."""
    bank = PromptBank(models, prompts, "", schedule(switch, prompts), sampler["num_steps"])
    cond = bank.conditioning(torch.arange(len(prompts)))
    images = generate_images(models, cond["encoder_hidden_states"], bank.negative, seeds,
                             prompt_index=cond.get("prompt_index"), **sampler)
    return prompt_rows(images, len(seeds))


def measure(models, seeds) -> dict:
    table = {}
    for name, sampler in SAMPLERS.items():
        rows = []
        for switch in SWITCHES:
            images = images_under(models, switch, seeds, sampler)
            pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
            counts = {"fine": 0, "coarse": 0, "other": 0}
            for i, image in enumerate(pixels):
                _, coarse_color, fine_color = fine_prompt(PROMPTS[i // len(seeds)])
                got = measure_colors(image)["color"]
                counts["fine" if got == fine_color else "coarse" if got == coarse_color else "other"] += 1
            n = len(pixels)
            row = {"switch": switch, "n": n, **{k: v / n for k, v in counts.items()}}
            row["stderr"] = max(math.sqrt(p * (1 - p) / n) for p in (row["fine"], row["coarse"]))
            rows.append(row)
            print(f"{name:40s} s={switch:.1f}: fine colour {row['fine']:.3f}, coarse {row['coarse']:.3f}, "
                  f"other {row['other']:.3f} (n={n}, stderr <= {row['stderr']:.3f})", flush=True)
        table[name] = rows
    return table


def labelled_grid(models, path: Path, prompts: list[str], seeds) -> None:
    """Rows: for each prompt, s = 1 (coarse alone), 0.6, 0.4, 0.2, 0 (fine alone); columns: seeds;
    the model's sampler."""
    switches = (1.0, 0.6, 0.4, 0.2, 0.0)
    sampler = SAMPLERS["model (T=20, eta=0, guidance 4)"]
    rows = [images_under(models, switch, seeds, sampler, prompts).reshape(len(prompts), len(seeds), 3, 32, 32)
            for switch in switches]
    labels = []
    for coarse in prompts:
        fine = fine_prompt(coarse)[0]
        for switch in switches:
            labels.append(f"'{coarse}'" if switch == 1 else f"'{fine}'" if switch == 0 else
                          f"coarse for the first {switch:.0%} of steps, then fine")
    grid = torch.stack(rows, 1).reshape(-1, 3, 32, 32)  # prompt-major, then switch, then seed
    save_grid(grid, len(labels), path)
    tiles = Image.open(path)
    margin = 300
    canvas = Image.new("RGB", (tiles.width + margin, tiles.height), "white")
    canvas.paste(tiles, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    cell = (tiles.height - 2) / len(labels)
    for r, text in enumerate(labels):
        draw.text((6, 2 + r * cell + cell / 2 - 6), text, fill="black")
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="samples per prompt and switch point")
    parser.add_argument("--grid", type=Path, help="write the labelled sample grid here")
    parser.add_argument("--json", type=Path, help="write the measured table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = load_default()
    t0 = time.perf_counter()
    table = measure(models, list(range(args.seeds)))
    if args.grid is not None:
        labelled_grid(models, args.grid, [PROMPTS[0], PROMPTS[6]], list(range(6)))
    result = {"device": f"CPU {platform.machine()}, 1 thread", "date": time.strftime("%Y-%m-%d"),
              "seconds": round(time.perf_counter() - t0, 1), "prompts": len(PROMPTS), "seeds": args.seeds,
              "pairs": {p: fine_prompt(p)[0] for p in PROMPTS}, "table": table}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{result['seconds']} s on {result['device']}")


if __name__ == "__main__":
    main()
