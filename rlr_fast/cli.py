"""`rlr-fast` (also `python -m rlr_fast`): finetune, sample, evaluate, convert.

    rlr-fast finetune --preset demo
    rlr-fast finetune --config my.yaml --set lr=1e-3 --set train_steps=200
    rlr-fast finetune --resume out/demo
    rlr-fast sample --lora out/demo --prompt "a red circle on a blue background" --seeds 0-3
    rlr-fast evaluate --lora out/demo --seeds 0-7 --reward brightness --reward color_match
    rlr-fast convert hpsv2 --checkpoint HPS_v2.1_compressed.pt --tokenizer CLIP-ViT-H-14 --out weights/HPSv2
    torchrun --nproc_per_node 4 -m rlr_fast finetune --preset sd14     # data parallel (rlr_fast.distributed)

User errors (a bad key, value, path or file) print one line and exit with status 2; a run stopped
by Ctrl-C or SIGTERM exits with 128 + the signal number after writing its checkpoint; a rank that
lost the others (RankFailure), a run of non-finite updates or a write that failed (a full disk:
after a checkpoint) prints one line and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def parse_seeds(text: str) -> list[int]:
    """'0,1,5' or '0-3' (inclusive) or a mix: '0-3,10'."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        try:
            seeds += list(range(int(low), int(high) + 1)) if sep else [int(part)]
        except ValueError:
            raise ValueError(f"--seeds expects integers like '0,1,2' or '0-3', got {text!r}") from None
        if sep and int(high) < int(low):
            raise ValueError(f"--seeds range {part!r} runs backwards; write it low-high, e.g. '{high}-{low}'")
    if not seeds:
        raise ValueError(f"--seeds names no seed: {text!r}")
    return seeds


def build_parser(help_preset: str = "demo") -> argparse.ArgumentParser:
    """The parser; `finetune --help` lists every config key with its value in `help_preset`."""
    parser = argparse.ArgumentParser(
        prog="rlr-fast", description="Reward fine-tuning of Stable Diffusion with the RLR gradient estimator.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{finetune,sample,evaluate,convert}")
    add_finetune(commands, help_preset)
    add_sample(commands)
    add_evaluate(commands)
    add_convert(commands)
    return parser


def add_finetune(commands, help_preset: str) -> None:
    from .config import config_help
    from .presets import PRESETS

    finetune = commands.add_parser(
        "finetune", help="fine-tune a LoRA to raise a reward",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a LoRA on the UNet to raise a reward. Values come from a preset, then a YAML "
                    "file, then --set overrides. Launched by torchrun (torchrun --nproc_per_node N -m rlr_fast "
                    "finetune ...) the run is data parallel: each rank rolls out batch_size / N of every "
                    "micro-batch, and the same config is the same run at any N.",
        epilog=f"config keys (for --set key=value and YAML files), with their values in preset {help_preset}:\n"
               + config_help(help_preset))
    finetune.add_argument("--preset", choices=sorted(PRESETS), help="named preset (default: demo, or with "
                                                                    "--resume the resumed run's config)")
    finetune.add_argument("--config", metavar="YAML", help="YAML file of config keys (may name a `preset:`)")
    finetune.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                          help="override one config key (repeatable), e.g. --set lr=1e-3; a mapping merges key "
                               "by key into the preset's (--set 'reward_kwargs={clip_path: /w/clip}' keeps its "
                               "dtype; a key set to null is removed); --set preset=NAME is --preset NAME")
    finetune.add_argument("--resume", metavar="DIR", help="continue the run in DIR (its latest checkpoint)")
    finetune.add_argument("--out", metavar="DIR", help="output directory (config key out_dir)")
    finetune.add_argument("--profile", action="store_true", help="NVTX ranges for nsys (config key profile)")


def add_model_args(sub: argparse.ArgumentParser) -> None:
    """The model and sampling options `sample` and `evaluate` share."""
    from .presets import PRESETS

    sub.add_argument("--preset", choices=sorted(PRESETS),
                     help="take model, steps, eta, guidance, prompts and reward defaults from this preset "
                          "(default: the LoRA run's config.yaml if there is one, else demo)")
    sub.add_argument("--config", metavar="YAML", help="take those defaults from a YAML config instead")
    sub.add_argument("--model", help="'default', a local diffusers Stable Diffusion folder, or a text-to-video "
                                     "folder (TextToVideoSDPipeline or AnimateDiffPipeline)")
    sub.add_argument("--motion-adapter", metavar="DIR", help="a MotionAdapter folder: animate the SD --model "
                                                             "with AnimateDiff")
    sub.add_argument("--frames", type=int, help="frames of each video (video models)")
    sub.add_argument("--lora", metavar="DIR", help="a LoRA directory written by finetune (or save_lora), or a "
                                                     "checkpoint of a run: RUN/checkpoints/step_N.safetensors")
    sub.add_argument("--seeds", default="0-3", help="seeds, e.g. '0,1,2' or '0-3' (default: 0-3)")
    sub.add_argument("--steps", type=int, help="DDIM steps")
    sub.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    sub.add_argument("--eta", type=float, help="DDIM eta")
    sub.add_argument("--negative-prompt", help="the negative prompt of guidance")
    sub.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    sub.add_argument("--dtype", help="float32, float16/bfloat16 on a GPU, or float64 on the CPU")


def add_sample(commands) -> None:
    sample = commands.add_parser("sample", help="images from a base model and an optional LoRA")
    add_model_args(sample)
    sample.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    sample.add_argument("--prompts-file", metavar="FILE", help="prompts, one per line")
    sample.add_argument("--out", default="samples", metavar="DIR", help="output directory (default: samples)")


def add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="a LoRA against its base model: rewards, diversity, KL, side-by-side samples",
        description="Sample a LoRA and its base model on the same held-out prompts, seeds and noises; write the "
                    "rewards, the samples' diversity and the KL of the LoRA sampler to the base one (mean +- "
                    "standard error) to eval.json and eval.md, and the samples side by side to eval_grid.png.")
    add_model_args(evaluate)
    evaluate.add_argument("--prompts", help="built-in prompt set or a text file (default: the held-out set of the "
                                            "config's prompts, e.g. demo_heldout for demo)")
    evaluate.add_argument("--reward", action="append", default=[], metavar="NAME",
                          help="a reward to score (repeatable: --reward aesthetic --reward hpsv2; default: the config's)")
    evaluate.add_argument("--reward-arg", action="append", default=[], metavar="[REWARD:]KEY=VALUE",
                          help="keyword argument of a reward's loader (repeatable), e.g. aesthetic:clip_path=/weights/"
                               "clip; the reward may be left out when only one is scored")
    evaluate.add_argument("--batch-size", type=int, default=16, help="prompts per sampling batch (default: 16)")
    evaluate.add_argument("--out", metavar="DIR", help="where eval.json, eval.md and eval_grid.png go "
                                                       "(default: LORA/eval)")


def add_convert(commands) -> None:
    convert = commands.add_parser("convert", help="convert a released HPSv2 or ImageReward checkpoint for its reward",
                                  description="Convert a released reward checkpoint (offline) to the transformers "
                                              "folder the reward of the same name loads.")
    convert.add_argument("model", choices=["hpsv2", "imagereward"])
    convert.add_argument("--checkpoint", required=True, metavar="FILE",
                         help="HPS_v2.1_compressed.pt / HPS_v2_compressed.pt, or ImageReward.pt")
    convert.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist yet), "
                                                                      "e.g. weights/HPSv2 or weights/ImageReward")
    convert.add_argument("--tokenizer", metavar="DIR", help="a local tokenizer folder to copy in: "
                         "laion/CLIP-ViT-H-14-laion2B-s32B-b79K's (hpsv2) or bert-base-uncased (imagereward)")
    convert.add_argument("--heads", type=int, help="attention heads per layer where the tensors do not say "
                         "(default 16: ViT-H/14's towers for hpsv2, the ViT-L/16 vision tower for imagereward)")
    convert.add_argument("--med-config", metavar="FILE", help="imagereward: its med_config.json (default: the one "
                         "beside the checkpoint, else the released values)")


def _run_finetune(args) -> int:
    from .config import load_config, parse_set
    from .train import finetune

    sets = list(args.sets)
    if args.out is not None:
        sets.append(f"out_dir={args.out}")
    if args.profile:
        sets.append("profile=true")
    if args.resume is not None and args.preset is None and args.config is None:
        overrides = dict(parse_set(text) for text in sets)  # the resumed run's config, with these changes
        if "preset" in overrides:
            raise ValueError(f"--set preset={overrides['preset']} with --resume: a resumed run keeps its own config "
                             "(change single keys with --set, or start a new run with --preset)")
        result = finetune(resume=args.resume, **overrides)
    else:
        cfg = load_config(preset=args.preset, path=args.config, sets=tuple(sets))
        if args.resume is not None:
            cfg = cfg.with_overrides({"resume": args.resume})
        result = finetune(cfg, **({"out_dir": args.out} if args.out is not None else {}))  # --out is checked on resume
    summary = {k: v for k, v in result.metrics.items() if k != "last"}
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone reports the run
        return 0
    print(json.dumps({"out_dir": str(result.out_dir), "lora": str(result.lora_path),
                      "metrics": str(result.metrics_path), "reward_curve": str(result.curve_path),
                      "summary": summary}, indent=2))
    return 0


def _inference_config(args):
    """The config whose model/sampling/reward settings `sample` and `evaluate` use, said on stderr:
    --config or --preset, else the LoRA run's config.yaml, else the preset made for the model
    (demo for the embedded default model, sd14 for a Stable Diffusion folder); flags override."""
    from .config import Config, load_config

    if args.config is not None or args.preset is not None:
        source = f"config {args.config}" if args.config is not None else f"preset {args.preset}"
        base = load_config(preset=args.preset, path=args.config)
    elif args.lora is not None and Path(args.lora).is_file():
        from .checkpoint import read_checkpoint

        source = f"the config of checkpoint {args.lora}"
        base = Config().with_overrides(read_checkpoint(args.lora).config, validate=False)
    elif args.lora is not None and (Path(args.lora) / "config.yaml").is_file():
        source = f"the LoRA run's {Path(args.lora) / 'config.yaml'}"
        base = load_config(path=Path(args.lora) / "config.yaml")
    else:
        preset = "demo" if args.model in (None, "default") else "sd14"
        source = f"preset {preset}"
        base = Config.from_preset(preset)
    flags = {"model": args.model, "num_steps": args.steps, "guidance_scale": args.guidance, "eta": args.eta,
             "negative_prompt": args.negative_prompt, "device": args.device, "dtype": args.dtype,
             "motion_adapter": args.motion_adapter, "num_frames": args.frames}
    cfg = base.with_overrides({k: v for k, v in flags.items() if v is not None}, validate=False)
    return cfg.validate(chain=False), source  # --steps may be fewer than the estimator's chain needs


def _load(args, cfg, source: str):
    """The model (with --lora) of `sample`/`evaluate` and the config it runs with, after saying on
    stderr which settings they use."""
    from .inference import DTYPES, check_model, load_for_inference, resolve_device

    check_model(cfg.model, cfg.motion_adapter)  # a missing folder before a missing GPU
    device, cfg = resolve_device(cfg)
    print(f"{args.command}: model {cfg.model}" + (f" with LoRA {args.lora}" if args.lora else " (no LoRA)") +
          f"; settings from {source} and flags: {cfg.num_steps} steps, guidance {cfg.guidance_scale}, eta {cfg.eta}, "
          f"{cfg.dtype} on {device}, resolution {cfg.resolution or 'native'}", file=sys.stderr)
    models = load_for_inference(cfg.model, args.lora, device, DTYPES[cfg.dtype], cfg.motion_adapter)
    return cfg, models, DTYPES[cfg.dtype]


def _lora_argument(args) -> None:
    """--lora as `load_for_inference` takes it: a LoRA folder or a checkpoint file (a LoRA file itself
    stands for its folder)."""
    from .lora import LORA_WEIGHT_NAME

    if args.lora is None:
        return
    lora = Path(args.lora)
    if lora.is_file() and lora.name == LORA_WEIGHT_NAME:
        args.lora = str(lora.parent)
    elif not lora.is_file() and not (lora / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"--lora {args.lora} holds no {LORA_WEIGHT_NAME}: give a finetune out_dir after its "
                                "run ended, or one of its checkpoints (RUN/checkpoints/step_N.safetensors)")


def _run_sample(args) -> int:
    import torch

    from .presets import load_prompts
    from .inference import generate_images, prompt_rows, save_grid
    from .prompts import PromptBank

    prompts = list(args.prompt) + (load_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ValueError("sample needs --prompt TEXT (repeatable) or --prompts-file FILE")
    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; choose a directory")
    _lora_argument(args)
    cfg, models, dtype = _load(args, *_inference_config(args))
    latent_hw = models.set_resolution(cfg.resolution)  # before encoding: SDXL's time ids follow it
    bank = PromptBank(models, prompts, cfg.negative_prompt, cfg.prompt_schedule, cfg.num_steps)
    if bank.steps.scheduled:
        print(f"sample: {bank.steps.scheduled} of the {len(prompts)} prompts follow the config's prompt_schedule",
              file=sys.stderr)
    cond = bank.conditioning(torch.arange(len(prompts)))
    latent_hw = models.set_resolution(cfg.resolution)  # the run's size, as evaluate and the training grids draw
    images = generate_images(models, cond["encoder_hidden_states"], bank.negative, seeds, num_steps=cfg.num_steps,
                             eta=cfg.eta, guidance_scale=cfg.guidance_scale, dtype=dtype, desc="sample",
                             latent_hw=latent_hw, prompt_index=cond.get("prompt_index"), num_frames=cfg.num_frames)
    images = prompt_rows(images, len(seeds))
    suffix = "gif" if images.dim() == 5 else "png"  # videos are animated GIFs
    out.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            save_grid(images[i * len(seeds) + j][None], 1, out / f"prompt{i:03d}_seed{seed}.{suffix}", min_cell=0,
                      pad=0)
    grid = save_grid(images, len(prompts), out / f"grid.{suffix}")
    (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    print(f"wrote {len(prompts) * len(seeds)} images and {grid} (rows: prompts in {out / 'prompts.txt'}, "
          f"columns: seeds {seeds})")
    return 0


def _reward_options(args, cfg, names: list[str]) -> dict[str, dict]:
    """Each reward's loader options: the config's reward_kwargs for its reward, then --reward-arg."""
    from .config import parse_set

    options = {name: dict(cfg.reward_kwargs) if name == cfg.reward else {} for name in names}
    for text in args.reward_arg:
        key, value = parse_set(text)
        name, sep, key = key.rpartition(":")
        if not sep and len(names) > 1:
            raise ValueError(f"--reward-arg {text}: several rewards are scored ({', '.join(names)}); say which one "
                             f"takes it, e.g. --reward-arg {names[0]}:{key}=...")
        name = name or names[0]
        if name not in options:
            raise ValueError(f"--reward-arg {text} names the reward {name!r}, which is not scored ({', '.join(names)})")
        options[name][key] = value
    return options


def _run_evaluate(args) -> int:
    import time
    from datetime import datetime

    from .presets import HELD_OUT, eval_prompts_of, load_prompts
    from .eval_report import table, write_report
    from .evaluation import GRID_PROMPTS, GRID_SEEDS, Evaluator
    from .inference import check_model, resolve_device
    from .rewards import get_reward, get_video_reward
    from .video import is_video_model

    if args.lora is None:
        raise ValueError("evaluate compares a LoRA with its base model: pass --lora DIR (a finetune out_dir, or a "
                         "folder holding pytorch_lora_weights.safetensors), or a checkpoint RUN/checkpoints/step_N."
                         "safetensors")
    _lora_argument(args)
    cfg, source = _inference_config(args)
    check_model(cfg.model, cfg.motion_adapter)  # before the rewards load
    cfg = resolve_device(cfg)[1]  # on the CPU a half-precision reward network loads in float32
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompts is None:
        spec, held_out = eval_prompts_of(cfg.prompts)
        if not held_out:
            print(f"note: prompts={cfg.prompts!r} has no built-in held-out set; evaluating on those prompts "
                  "(pass --prompts for others)", file=sys.stderr)
    else:
        spec = args.prompts
        held_out = True if spec == HELD_OUT.get(cfg.prompts) else False if spec == cfg.prompts else None
    prompts, seeds = load_prompts(spec), parse_seeds(args.seeds)
    out = Path(args.out) if args.out is not None else _default_eval_out(Path(args.lora))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; choose a directory")
    names = list(dict.fromkeys(args.reward or [cfg.reward]))
    options = _reward_options(args, cfg, names)
    load = get_video_reward if is_video_model(cfg.model, cfg.motion_adapter) else get_reward
    rewards = {name: load(name, **options[name]) for name in names}  # a bad name or path stops before the model
    started = time.perf_counter()
    cfg, models, dtype = _load(args, cfg, source)
    evaluator = Evaluator(models, cfg, {n: r.to(models.unet.device) for n, r in rewards.items()}, prompts, seeds,
                          batch_size=args.batch_size)
    result = evaluator()
    settings = {"model": cfg.model, "lora": args.lora, "settings_from": source, "date": datetime.now().isoformat(
        timespec="seconds"), "prompts": spec, "held_out": held_out, "num_steps": cfg.num_steps, "eta": cfg.eta,
        "guidance_scale": cfg.guidance_scale, "negative_prompt": cfg.negative_prompt, "resolution": cfg.resolution,
        "dtype": cfg.dtype, "device": str(models.unet.device), "batch_size": args.batch_size,
        "reward_options": options, "grid_prompts": min(GRID_PROMPTS, len(prompts)),
        "grid_seeds": min(GRID_SEEDS, len(seeds)), "seconds": time.perf_counter() - started}
    report = {"settings": settings, **result}
    paths = write_report(report, evaluator.grids, out)
    print(table(report))
    print(f"\nwrote {paths['json']}, {paths['markdown']} and {paths['grid']}")
    return 0


def _default_eval_out(lora: Path) -> Path:
    """LORA/eval for a LoRA folder; RUN/eval/step_N for a checkpoint RUN/checkpoints/step_N.safetensors
    (beside any other checkpoint file: eval_step_N)."""
    if lora.is_dir():
        return lora / "eval"
    return lora.parent.parent / "eval" / lora.stem if lora.parent.name == "checkpoints" else (
        lora.parent / f"eval_{lora.stem}")


def _run_convert(args) -> int:
    from .rewards.convert import convert

    print(convert(args.model, args.checkpoint, args.out, tokenizer=args.tokenizer, heads=args.heads,
                  med_config=args.med_config))
    return 0


def _help_preset(argv: list[str]) -> str:
    """The preset `finetune --help` shows values of: --preset's, else the --config file's, else demo."""
    from .config import read_yaml
    from .presets import PRESETS

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    preset = known.preset
    if preset is None and known.config is not None:
        try:
            preset = read_yaml(known.config).get("preset")
        except (ValueError, OSError):
            pass  # the run itself reports a bad file
    return preset if preset in PRESETS else "demo"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_help_preset(argv) if "-h" in argv or "--help" in argv else "demo").parse_args(argv)
    run = {"finetune": _run_finetune, "sample": _run_sample, "evaluate": _run_evaluate,
           "convert": _run_convert}[args.command]
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"rlr-fast {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training loop has written a checkpoint and said how to resume
        signum = getattr(e, "signum", 2)
        print(f"rlr-fast {args.command}: stopped ({'SIGTERM' if signum == 15 else 'interrupted'})", file=sys.stderr)
        return 128 + signum
    except RuntimeError as e:
        from .distributed import RankFailure
        from .run_dir import WriteError
        from .train import NonFiniteError

        if not isinstance(e, (NonFiniteError, RankFailure, WriteError)):
            raise
        print(f"rlr-fast {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
