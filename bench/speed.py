"""Speed, side by side in one run: the fused DDIM kernel, rollouts, updates; against the targets.

    python bench/speed.py                    # GPU: SD1.4 architecture, random weights, fp16
    python bench/speed.py --tiny             # CPU (or GPU): the tiny SD; every code path in ~1-2 min
    python bench/speed.py --sections kernel  # one section (kernel, rollout, update; comma-separated)

1. kernel: the fused DDIM step (with CFG), forward and backward, on each fused backend of the device
   (Triton and _C's CUDA kernels on a GPU, _C's C++ on a CPU), and the same step unfused in plain
   PyTorch in the inputs' dtype: the bytes it must move / its time, against the peak bandwidth; and a
   plain copy_ of one tensor, the bandwidth this device reaches in practice beside the datasheet peak.
2. rollout: T steps, batches 1 and 4, CFG 7.5, eta 1: rlr_fast.rollout and, on a GPU, its CUDA-graph
   replay (GraphedRollout) vs the denoising loop of diffusers' StableDiffusionPipeline on the same
   UNet (prompt embeddings given, output_type="latent", so only the loop runs).
3. update: one update (rollout + reward + gradient), batch 2: RLR through rlr_fast.estimate vs the
   naive one-graph implementation of the same estimator (bench/common.py; on a GPU at the largest T
   that fits it) vs AlignProp-style truncated backprop (estimate(method="truncated_bp", truncated_bp_k=1)) vs a
   DDPO-style update (estimate(method="ddpo")). Before timing, the naive and the engine's gradients
   are checked equal on the tiny SD.
Achieved TFLOP/s: the FLOPs of one call (torch.utils.flop_counter) / its median time, and its
fraction of the device's dense fp16 peak (bench/common.py's table).

Warm-up calls are excluded, times are medians of repeats; device, dtype and shapes are printed.
Results: bench/results/speed_<device>.md and .csv, rewritten after every row, so a run stopped
midway keeps what it measured. Peak memory is bench/memory.py's. Targets (GPU; issue 9): rollout
>= 1.3x the diffusers loop at batch 1; fused kernel >= 80% of peak bandwidth; UNet work >= 50% of
dense fp16 peak; and the update >= 2x the naive one-graph update.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (build_models, current_device, flops_of, latent_reward_fn, lora_grads,  # noqa: E402
                          max_rel_diff, median, naive_rlr_update, time_it, unfused_ddim_step, write_results,
                          zero_grads)
from rlr_fast import compiled, estimate, rollout  # noqa: E402
from rlr_fast.ddim import triton_available, ddim_step, resolve_backend  # noqa: E402

planner = importlib.import_module("rlr_fast.plan")  # rlr_fast.plan itself is bound to the function
GUIDANCE = 7.5
SECTIONS = ("kernel", "rollout", "update")
TARGETS = {"rollout_vs_diffusers_b1": 1.3, "kernel_bandwidth_fraction": 0.8, "unet_flop_fraction": 0.5,
           "update_vs_naive": 2.0}


class Bench:
    """Collects result rows, prints each one as it is measured and then calls on_row() (main writes the
    results files there, so a run cut short keeps every row it measured)."""

    def __init__(self, device, dtype, repeats: int, warmup: int):
        self.device, self.dtype, self.repeats, self.warmup = device, dtype, repeats, warmup
        self.rows: list[dict] = []
        self.on_row = lambda: None

    def time(self, section: str, name: str, fn, *, shapes: str, flops: int = 0, bytes_moved: int = 0,
             calls: int = 1, **extra) -> dict:
        """Median seconds of `calls` back-to-back calls of fn, divided by `calls` (a short kernel's
        launch overhead then overlaps the previous call instead of adding to it)."""
        def run():
            for _ in range(calls):
                fn()
        times = [t / calls for t in time_it(run, self.device, warmup=self.warmup, repeats=self.repeats)]
        t = median(times)
        row = dict(section=section, name=name, shapes=shapes, dtype=str(self.dtype).replace("torch.", ""),
                   median_ms=t * 1e3, min_ms=min(times) * 1e3, repeats=len(times), **extra)
        if flops:
            row["gflop"] = flops / 1e9
            row["tflops_achieved"] = flops / t / 1e12
            if self.device.peak_tflops:
                row["fraction_of_flop_peak"] = flops / t / 1e12 / self.device.peak_tflops
        if bytes_moved:
            row["gbps"] = bytes_moved / t / 1e9
            if self.device.peak_gbps:
                row["fraction_of_bandwidth"] = bytes_moved / t / 1e9 / self.device.peak_gbps
        self.rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        self.on_row()
        return row


# ----------------------------------------------------------------------------------------------
# 1. The fused DDIM step


def fused_backends(device) -> list[str]:
    if not device.is_cuda:
        return ["cpu"] if compiled.available() else []
    return (["triton"] if triton_available() else []) + (["cuda"] if compiled.has_cuda() else [])


def kernel_section(b: Bench, elements: int, calls: int) -> dict:
    """GB/s of the fused step (with CFG), forward and backward, per fused backend and unfused, and of a
    plain copy_ of one tensor: what this device's memory reaches in practice, beside the datasheet peak.
    Returns {backend: min(forward, backward) fraction of the peak bandwidth, "copy_": copy_'s fraction}
    (only where the device's peak is known)."""
    dev, dt = b.device.torch_device, b.dtype
    batch = 8
    shape = (batch, elements // batch)
    x, u, c, noise = (torch.randn(shape, device=dev, dtype=dt) for _ in range(4))
    coef = [torch.rand(batch, device=dev, dtype=torch.float64) + 0.5 for _ in range(3)]
    nbytes = x.numel() * x.element_size()
    shapes = f"{batch} x {elements // batch} elements, with CFG"
    # forward reads x, u, c, noise and writes prev and mean; backward reads the two cotangents and the
    # noise and writes the gradients of x, u, c and noise (the per-sample log-densities are negligible)
    fractions = {}
    for backend in fused_backends(b.device):
        fwd = b.time("kernel", f"ddim_step forward [{backend}]", lambda: ddim_step(
            x, u, noise, *coef, model_output_cond=c, guidance_scale=GUIDANCE, backend=backend), shapes=shapes,
            bytes_moved=6 * nbytes, calls=calls)
        leaves = [t.clone().requires_grad_(True) for t in (x, u, c, noise)]
        outs = ddim_step(leaves[0], leaves[1], leaves[3], *coef, model_output_cond=leaves[2], guidance_scale=GUIDANCE,
                         backend=backend)
        grads = [torch.randn_like(o) for o in outs]
        bwd = b.time("kernel", f"ddim_step backward [{backend}]", lambda: torch.autograd.grad(
            outs, leaves, grads, retain_graph=True), shapes=shapes, bytes_moved=7 * nbytes, calls=calls)
        if "fraction_of_bandwidth" in fwd:
            fractions[backend] = min(fwd["fraction_of_bandwidth"], bwd["fraction_of_bandwidth"])
    b.time("kernel", "ddim_step forward [unfused PyTorch, inputs' dtype]", lambda: unfused_ddim_step(
        x, u, noise, *coef, c, GUIDANCE), shapes=shapes, bytes_moved=6 * nbytes, calls=calls)
    copy_target = torch.empty_like(x)
    ceiling = b.time("kernel", "copy_ of one tensor (achievable bandwidth)", lambda: copy_target.copy_(x),
                     shapes=f"{batch} x {elements // batch} elements", bytes_moved=2 * nbytes, calls=calls)
    if "fraction_of_bandwidth" in ceiling:
        fractions["copy_"] = ceiling["fraction_of_bandwidth"]
    return fractions


# ----------------------------------------------------------------------------------------------
# 2. Rollouts


def diffusers_pipeline(models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=None, tokenizer=None, unet=models.unet,
                                   scheduler=models.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rollout_section(b: Bench, models, steps: int, batches: list[int]) -> dict:
    """Returns {batch: (diffusers / eager, diffusers / CUDA graph or None)} and the best fraction of
    the FLOP peak any rollout reached, as "flop_fraction": (fraction, row name)."""
    from rlr_fast.cuda_graph import GraphedRollout

    dev, dt = b.device.torch_device, b.dtype
    pipe = diffusers_pipeline(models)
    graphed = GraphedRollout(models.unet, models.scheduler) if b.device.is_cuda else None
    ratios, best = {}, (0.0, "")
    for batch in batches:
        size = models.latent_size
        x_T = torch.randn(batch, 4, size, size, device=dev, dtype=dt)
        cond = torch.randn(batch, 77, models.cond_dim, device=dev, dtype=dt)
        negative = torch.randn(batch, 77, models.cond_dim, device=dev, dtype=dt)
        shapes = f"batch {batch}, latents {size}x{size}, T {steps}, CFG {GUIDANCE}, eta 1"
        kw = dict(num_steps=steps, eta=1.0, encoder_hidden_states=cond, negative_encoder_hidden_states=negative,
                  guidance_scale=GUIDANCE)
        variants = {"rlr_fast.rollout": lambda: rollout(models.unet, models.scheduler, x_T, **kw),
                    "diffusers StableDiffusionPipeline loop": lambda: pipe(
                        prompt_embeds=cond, negative_prompt_embeds=negative, latents=x_T.clone(),
                        num_inference_steps=steps, guidance_scale=GUIDANCE, eta=1.0, output_type="latent")}
        if graphed is not None:
            variants["rlr_fast GraphedRollout (CUDA graph)"] = lambda: graphed(x_T, **kw)
        flops = flops_of(variants["rlr_fast.rollout"])  # the same UNet calls in every variant
        ms = {name: b.time("rollout", name, fn, shapes=shapes, flops=flops) for name, fn in variants.items()}
        theirs = ms["diffusers StableDiffusionPipeline loop"]["median_ms"]
        ratios[batch] = (theirs / ms["rlr_fast.rollout"]["median_ms"],
                         theirs / ms["rlr_fast GraphedRollout (CUDA graph)"]["median_ms"] if graphed else None)
        for name, row in ms.items():
            if row.get("fraction_of_flop_peak", 0.0) > best[0]:
                best = (row["fraction_of_flop_peak"], f"{name}, batch {batch}")
    return dict(ratios=ratios, flop_fraction=best if best[1] else None)


# ----------------------------------------------------------------------------------------------
# 3. Updates


def update_section(b: Bench, models, steps: int, batch: int, h: int, estimate_options: dict, *,
                   naive: bool, others: bool) -> dict:
    """Time one RLR update of the engine and, with `naive`, of the one-graph baseline at the same T;
    with `others`, the truncated-backprop and DDPO updates too."""
    dev, dt = b.device.torch_device, b.dtype
    size = models.latent_size
    x_T = torch.randn(batch, 4, size, size, device=dev, dtype=dt)
    cond = torch.randn(batch, 77, models.cond_dim, device=dev, dtype=dt)
    negative = torch.randn(batch, 77, models.cond_dim, device=dev, dtype=dt)
    options = dict(estimate_options)
    reward_fn = latent_reward_fn(models, batch, decode_chunk=options.pop("decode_chunk", 1),
                                 checkpoint_vae=options.pop("checkpoint_vae", True))
    kw = dict(num_steps=steps, eta=1.0, encoder_hidden_states=cond, negative_encoder_hidden_states=negative,
              guidance_scale=GUIDANCE)
    j = min(steps // 2, steps - h)  # the half-order segment j+1 .. j+h must fit the chain
    shapes = f"batch {batch}, latents {size}x{size}, T {steps}, CFG {GUIDANCE}, f 1, h {h}, j {j}"

    def engine(method: str, **method_options):
        def update():
            zero_grads(models.unet)
            traj = rollout(models.unet, models.scheduler, x_T, **kw)
            estimate(models.unet, traj, reward_fn, method=method, **options, **method_options)
        return update

    def one_graph():
        zero_grads(models.unet)
        naive_rlr_update(models.unet, models.scheduler, x_T, reward_fn, j=j, h=h, cond=cond,
                         negative=negative, guidance_scale=GUIDANCE, num_steps=steps, eta=1.0)

    rlr = engine("rlr", first_order_steps=1, h=h, j=j)
    ours = b.time("update", "RLR, rlr_fast (rollout + estimate)", rlr, shapes=shapes, flops=flops_of(rlr),
                  options=str(estimate_options))
    result = {}
    if naive:
        try:
            theirs = b.time("update", "RLR, naive one-graph autograd", one_graph, shapes=shapes,
                            flops=flops_of(one_graph))
            result["update_vs_naive"] = theirs["median_ms"] / ours["median_ms"]
            # what bounds the speed-up: the engine recomputes every step it differentiates
            # (docs/estimator.md §7: T + 3 (f + h + |C|) forward-equivalents against the graph's 3 T)
            result["flop_bound"] = theirs["gflop"] / ours["gflop"]
            result["naive_steps"] = steps
        except torch.cuda.OutOfMemoryError:
            b.rows.append(dict(section="update", name="RLR, naive one-graph autograd", shapes=shapes, median_ms="OOM"))
            torch.cuda.empty_cache()
    if others:
        for name, update in (("AlignProp-style truncated backprop (K = 1)", engine("truncated_bp", truncated_bp_k=1)),
                             ("DDPO-style update", engine("ddpo"))):
            b.time("update", name, update, shapes=shapes, flops=flops_of(update))
    return result


def naive_steps_that_fit(total_gib: float, steps: int) -> int:
    """The largest T (of steps, 20, 10, 5) whose naive one-graph update the planner estimates below 80%
    of the GPU's memory: the naive graph keeps all T steps, so at T = 50 it does not fit one GPU."""
    from bench.memory import naive_estimate_bytes, sd14_plan

    for T in (steps, 20, 10, 5):
        fastest = sd14_plan(num_steps=T)
        if naive_estimate_bytes(fastest, planner.default_table()) < 0.8 * total_gib * 2**30:
            return T
    return 5


def updates(b: Bench, models, steps: int, tiny: bool) -> dict:
    """The update section: on a GPU the engine with the fastest plan that fits 80% of the GPU, and the
    naive baseline at the largest T that fits it (the engine timed again at that T for the ratio)."""
    if tiny:
        return update_section(b, models, steps=steps, batch=2, h=4, estimate_options={}, naive=True, others=True)
    from bench.memory import engine_options, sd14_plan

    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    options = engine_options(sd14_plan(0.8 * total_gib, num_steps=steps))
    result = update_section(b, models, steps=steps, batch=2, h=4, estimate_options=options, naive=False, others=True)
    result.update(update_section(b, models, steps=naive_steps_that_fit(total_gib, steps), batch=2, h=4,
                                 estimate_options=options, naive=True, others=False))
    return result


def check_naive_matches_engine() -> float:
    """On the tiny SD in float32 on the CPU: the naive one-graph gradient equals rollout + estimate's."""
    device = current_device(force_cpu=True)
    models = build_models(device, tiny=True, dtype=torch.float32)
    batch, steps, h, j = 2, 8, 2, 3
    x_T = torch.randn(batch, 4, models.latent_size, models.latent_size, generator=torch.Generator().manual_seed(0))
    cond, negative = torch.randn(batch, 77, models.cond_dim), torch.randn(batch, 77, models.cond_dim)
    reward_fn = latent_reward_fn(models, batch, decode_chunk=1, checkpoint_vae=True)
    kw = dict(num_steps=steps, eta=1.0, guidance_scale=GUIDANCE)
    zero_grads(models.unet)
    naive_rlr_update(models.unet, models.scheduler, x_T, reward_fn, j=j, h=h, cond=cond, negative=negative,
                     generator=torch.Generator().manual_seed(1), **kw)
    naive = lora_grads(models.unet)
    zero_grads(models.unet)
    traj = rollout(models.unet, models.scheduler, x_T, encoder_hidden_states=cond,
                   negative_encoder_hidden_states=negative, generator=torch.Generator().manual_seed(1), **kw)
    estimate(models.unet, traj, reward_fn, method="rlr", first_order_steps=1, h=h, j=j)
    return max_rel_diff(naive, lora_grads(models.unet))


# ----------------------------------------------------------------------------------------------
# Verdicts and the run


def verdict(name: str, value, target: float, unit: str = "", note: str = "") -> str:
    """`name: value (target >= t) -> pass | MISS by ...`; every target here is a lower bound."""
    if value is None:
        return f"{name}: not measured{note}"
    if value >= target:
        return f"{name}: {value:.3g}{unit} (target >= {target:g}{unit}) -> pass{note}"
    miss = target - value
    return f"{name}: {value:.3g}{unit} (target >= {target:g}{unit}) -> MISS by {miss:.3g}{unit} ({miss / target:.0%}){note}"


def _naive_note(update: dict) -> str:
    if "flop_bound" not in update:
        return " (the naive one-graph update did not fit the GPU at any T tried)"
    return (f" at T = {update['naive_steps']}; bound: naive FLOPs / engine FLOPs = {update['flop_bound']:.2f}x, so at "
            "equal efficiency the engine is slower (it recomputes each differentiated step) and wins on memory: "
            "O(1) steps alive instead of O(T) (bench/memory.py)")


def verdicts(device, results: dict) -> list[str]:
    on_cpu = "" if device.is_cuda else " [CPU, tiny SD: the targets are for a GPU]"
    lines = []
    if "kernel" in results:
        default = resolve_backend(device.torch_device)
        copy_fraction = results["kernel"].get("copy_")
        note = (f" (a plain copy_ reaches {copy_fraction:.3g} of the peak)" if copy_fraction is not None
                else " (CPU: no bandwidth peak known)" if not device.is_cuda else "")
        lines.append(verdict(f"fused kernel [{default}] fraction of peak bandwidth (min of forward, backward)",
                             results["kernel"].get(default), TARGETS["kernel_bandwidth_fraction"], note=note))
    if "rollout" in results:
        ratios = results["rollout"]["ratios"]
        for batch, (eager, graph) in ratios.items():
            best = max(r for r in (eager, graph) if r is not None)
            detail = f"; eager {eager:.3g}x" + (f", CUDA graph {graph:.3g}x" if graph is not None else "")
            if batch == 1:
                lines.append(verdict("rollout speed-up vs diffusers loop, batch 1", best,
                                     TARGETS["rollout_vs_diffusers_b1"], "x", detail + on_cpu))
            else:
                lines.append(f"rollout speed-up vs diffusers loop, batch {batch}: {best:.3g}x (no target){detail}{on_cpu}")
        flop = results["rollout"]["flop_fraction"]
        lines.append(verdict("UNet work, best fraction of dense fp16 peak", flop and flop[0],
                             TARGETS["unet_flop_fraction"], note=f" ({flop[1]})" if flop else on_cpu))
    if "update" in results:
        update = results["update"]
        lines.append(verdict("update speed-up vs naive one-graph RLR", update.get("update_vs_naive"),
                             TARGETS["update_vs_naive"], "x", on_cpu + _naive_note(update)))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny SD (the only choice without a GPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    parser.add_argument("--steps", type=int, default=50, help="T of the rollouts and updates")
    parser.add_argument("--batches", default="1,4", help="rollout batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: 10 on a GPU, 3 on a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 GPU, 1 CPU)")
    parser.add_argument("--kernel-elements", type=int, default=None, help="elements per tensor of the kernel "
                        "section (default: 2^26 on a GPU, 2^22 on a CPU)")
    parser.add_argument("--calls", type=int, default=None, help="kernel calls per timed repeat, back to back "
                        "(default: 10 on a GPU, so launches overlap the previous call; 1 on a CPU)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if not set(sections) <= set(SECTIONS):
        parser.error(f"--sections takes {SECTIONS}, got {args.sections!r}")
    device = current_device()
    tiny = args.tiny or not device.is_cuda
    dtype = torch.float16 if device.is_cuda else torch.float32
    repeats = args.repeats or (10 if device.is_cuda else 3)
    b = Bench(device, dtype, repeats=repeats, warmup=args.warmup if args.warmup is not None else
              (3 if device.is_cuda else 1))

    print(f"device: {device.name}; torch {torch.__version__}; dtype {dtype}; "
          f"peak {device.peak_tflops or 'n/a'} TFLOP/s, {device.peak_gbps or 'n/a'} GB/s", flush=True)
    header = [f"# Speed — {device.name}", "",
              f"torch {torch.__version__}, dtype {dtype}; medians of {repeats} repeats after warm-up; peak "
              f"{device.peak_tflops or 'n/a'} TFLOP/s dense fp16, {device.peak_gbps or 'n/a'} GB/s; "
              f"{time.strftime('%Y-%m-%d')}.", ""]
    if not device.is_cuda:
        header += ["**CPU run** (no GPU in this session): every figure below is a CPU figure on the tiny SD; it",
                   "exercises the code paths and says nothing about GPU speed. GPU figures: not measured.", ""]
    results, models = {}, None

    def save() -> tuple[list[str], Path]:
        lines = verdicts(device, results)
        text = header + ["## Targets", ""] + [f"- {line}" for line in lines] + ["", "## Measurements"]
        return lines, write_results(f"speed_{device.label}", b.rows, "\n".join(text))[1]

    b.on_row = save

    for section in sections:
        start = time.perf_counter()
        print(f"section {section}", flush=True)
        if section == "kernel":
            default = (1 << 26) if device.is_cuda else (1 << 22)
            calls = args.calls or (10 if device.is_cuda else 1)
            results["kernel"] = kernel_section(b, args.kernel_elements or default, calls=calls)
        else:
            if models is None:
                models = build_models(device, tiny=tiny, dtype=dtype)
                header.insert(3, f"Models: {models.description}.")
                print(f"models: {models.description}", flush=True)
            if section == "rollout":
                results["rollout"] = rollout_section(b, models, args.steps, [int(x) for x in args.batches.split(",")])
            else:
                error = check_naive_matches_engine()
                print(f"check: naive one-graph RLR gradient vs rlr_fast (tiny SD, fp32, CPU): max rel diff "
                      f"{error:.2e}", flush=True)
                if not error < 1e-4:
                    raise SystemExit("the naive baseline does not compute the engine's estimator; timings would "
                                     "be meaningless")
                header.insert(3, f"Naive-vs-engine gradient check (tiny SD, fp32, CPU): max relative difference "
                                 f"{error:.2e}.")
                results["update"] = updates(b, models, args.steps, tiny)
        save()
        print(f"section {section} took {time.perf_counter() - start:.1f} s", flush=True)
    lines, md_path = save()
    print("\n".join(lines))
    print(f"wrote {md_path} and its .csv")


if __name__ == "__main__":
    main()
