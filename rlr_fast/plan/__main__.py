"""`python -m rlr_fast.plan`: the memory plan of a preset or config file, or regenerate the cache."""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

from ..config import load_config
from .generate import generate_measurements
from .search import plan
from .table import MEASUREMENTS_FILE


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlr_fast.plan",
                                     description="Estimate one update's peak memory and choose the memory options.")
    parser.add_argument("--preset", default=None, help="preset to plan (default: the config file's, else sd14)")
    parser.add_argument("--config", default=None, help="a YAML config file, as rlr-fast finetune takes")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set batch_size=4")
    parser.add_argument("--max-memory-gb", type=float, default=None, help="the budget (default: the config's)")
    parser.add_argument("--model", default=None,
                        help="architectures: 'sd14', 'sdxl', 'sdxl-vae-fp16-fix', 'sd35m', 'default' or a diffusers "
                             "folder (default: the config's model folder, else the built-in one its name says, "
                             "else SD1.4)")
    parser.add_argument("--measure", action="store_true", help=f"regenerate {MEASUREMENTS_FILE.name} (minutes)")
    args = parser.parse_args(argv)
    if args.measure:
        start = time.time()
        print(f"wrote {generate_measurements()} in {time.time() - start:.0f} s")
        return
    preset = args.preset or (None if args.config else "sd14")
    cfg = load_config(preset=preset, path=args.config, sets=tuple(args.sets))
    print(plan(cfg, args.max_memory_gb, model=args.model).table())


if __name__ == "__main__":
    main()
