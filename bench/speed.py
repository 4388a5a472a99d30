"""Speed, side by side in one run: rollouts, updates, the fused DDIM kernel; against the targets.

    python bench/speed.py            # GPU: SD1.4 architecture, random weights, fp16
    python bench/speed.py --tiny     # CPU (or GPU): the tiny SD; exercises every code path in ~1-2 min

1. Rollout, T = 50, batch 1 and 4, CFG 7.5, eta 1: rlr_fast.rollout (and its CUDA-graph replay on
   a GPU) vs the denoising loop of diffusers' StableDiffusionPipeline on the same UNet
   (prompt embeddings given, output_type="latent", so only the loop runs).
2. One update (rollout + reward + gradient), batch 2: RLR through rlr_fast.estimate vs the naive
   one-graph implementation of the same estimator (bench/common.py) vs AlignProp-style truncated
   backprop (estimate(method="truncated_bp", truncated_bp_k=1)) vs a DDPO-style update (estimate(method="ddpo"),
   one inner epoch). Before timing, the naive and the engine's gradients are checked equal.
3. Achieved fraction of the FLOP floor: FLOPs of each timed call (torch.utils.flop_counter),
   divided by its median time and by the device's peak dense fp16 FLOP/s (bench/common.py table).
4. The fused DDIM step (rlr_fast.ddim.ddim_step, the dispatcher's backend) forward and backward:
   bytes moved / time vs the device's peak memory bandwidth, and the unfused PyTorch reference.

Warm-up calls are excluded, times are medians of repeats, and device, dtype and shapes are printed.
Results: bench/results/<device>.md and .csv. Targets (GPU): rollout >= 1.3x the diffusers loop at
batch 1; update >= 2x naive; fused kernel >= 80% of peak bandwidth; peak memory <= 6 GiB.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (build_models, current_device, flops_of, latent_reward_fn, lora_grads,  # noqa: E402
                          max_rel_diff, median, naive_rlr_update, peak_memory, time_it, write_results, zero_grads)
from bench.memory import engine_options, naive_estimate_bytes, sd14_plan  # noqa: E402
from rlr_fast import estimate, rollout  # noqa: E402
from rlr_fast.ddim import ddim_step, ddim_step_reference, resolve_backend  # noqa: E402

planner = importlib.import_module("rlr_fast.plan")  # rlr_fast.plan itself is bound to the function
GUIDANCE = 7.5
TARGETS = {"rollout_vs_diffusers_b1": 1.3, "update_vs_naive": 2.0, "kernel_bandwidth_fraction": 0.8,
           "peak_memory_gib": 4.0}


class Bench:
    """Collects result rows and prints each one as it is measured."""

    def __init__(self, device, dtype, repeats: int, warmup: int):
        self.device, self.dtype, self.repeats, self.warmup = device, dtype, repeats, warmup
        self.rows: list[dict] = []

    def time(self, section: str, name: str, fn, *, shapes: str, flops_fn=None, bytes_moved: int = 0, **extra) -> dict:
        times = time_it(fn, self.device, warmup=self.warmup, repeats=self.repeats)
        t = median(times)
        row = dict(section=section, name=name, shapes=shapes, dtype=str(self.dtype).replace("torch.", ""),
                   median_ms=t * 1e3, min_ms=min(times) * 1e3, repeats=len(times), **extra)
        if flops_fn is not None:
            flops = flops_of(flops_fn)
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
        return row


def diffusers_pipeline(models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=None, tokenizer=None, unet=models.unet,
                                   scheduler=models.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rollout_section(b: Bench, models, steps: int) -> dict:
    from rlr_fast.cuda_graph import GraphedRollout

    dev, dt = b.device.torch_device, b.dtype
    pipe = diffusers_pipeline(models)
    graphed = GraphedRollout(models.unet, models.scheduler) if b.device.is_cuda else None
    ratios = {}
    for batch in (1, 4):
        size = models.latent_size
        x_T = torch.randn(batch, 4, size, size, device=dev, dtype=dt)
        cond = torch.randn(batch, 77, models.cond_dim, device=dev, dtype=dt)
        negative = torch.randn(batch, 77, models.cond_dim, device=dev, dtype=dt)
        shapes = f"batch {batch}, latents {size}x{size}, T {steps}, CFG {GUIDANCE}, eta 1"
        kw = dict(num_steps=steps, eta=1.0, encoder_hidden_states=cond, negative_encoder_hidden_states=negative,
                  guidance_scale=GUIDANCE)

        def ours():
            return rollout(models.unet, models.scheduler, x_T, **kw)

        def theirs():
            return pipe(prompt_embeds=cond, negative_prompt_embeds=negative, latents=x_T.clone(),
                        num_inference_steps=steps, guidance_scale=GUIDANCE, eta=1.0, output_type="latent")

        t_ours = b.time("rollout", "rlr_fast.rollout", ours, shapes=shapes, flops_fn=ours)["median_ms"]
        t_theirs = b.time("rollout", "diffusers StableDiffusionPipeline loop", theirs, shapes=shapes,
                          flops_fn=theirs)["median_ms"]
        ratios[batch] = t_theirs / t_ours
        if graphed is not None:
            def replayed():
                return graphed(x_T, **kw)
            t_graph = b.time("rollout", "rlr_fast GraphedRollout (CUDA graph)", replayed, shapes=shapes,
                             flops_fn=ours)["median_ms"]
            ratios[batch] = max(ratios[batch], t_theirs / t_graph)
    return ratios


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
    shapes = f"batch {batch}, latents {size}x{size}, T {steps}, CFG {GUIDANCE}, f 1, h {h}"

    def engine(method: str, **method_options):
        def update():
            zero_grads(models.unet)
            traj = rollout(models.unet, models.scheduler, x_T, **kw)
            estimate(models.unet, traj, reward_fn, method=method, **options, **method_options)
        return update

    def one_graph():
        zero_grads(models.unet)
        naive_rlr_update(models.unet, models.scheduler, x_T, reward_fn, j=steps // 2, h=h, cond=cond,
                         negative=negative, guidance_scale=GUIDANCE, num_steps=steps, eta=1.0)

    rlr = engine("rlr", first_order_steps=1, h=h, j=steps // 2)
    ours = b.time("update", "RLR, rlr_fast (rollout + estimate)", rlr, shapes=shapes, flops_fn=rlr,
                  options=str(estimate_options))
    result = {}
    if naive:
        try:
            theirs = b.time("update", "RLR, naive one-graph autograd", one_graph, shapes=shapes, flops_fn=one_graph)
            result["update_vs_naive"] = theirs["median_ms"] / ours["median_ms"]
            # what bounds the speed-up: the engine recomputes every step it differentiates
            # (rlr_math.md section 4: T + 3 (f + h + |C|) forward-equivalents against the graph's 3 T)
            result["flop_bound"] = theirs["gflop"] / ours["gflop"]
            result["naive_steps"] = steps
        except torch.cuda.OutOfMemoryError:
            b.rows.append(dict(section="update", name="RLR, naive one-graph autograd", shapes=shapes, median_ms="OOM"))
            torch.cuda.empty_cache()
    if others:
        truncated = engine("truncated_bp", truncated_bp_k=1)
        b.time("update", "AlignProp-style truncated backprop (K = 1)", truncated, shapes=shapes, flops_fn=truncated)
        ddpo = engine("ddpo")
        b.time("update", "DDPO-style update (1 inner epoch)", ddpo, shapes=shapes, flops_fn=ddpo)
    return result


def peak_of_rlr_update(device, models, dtype, options: dict, *, steps: int = 50, batch: int = 2, h: int = 4) -> float:
    """GiB at the peak (torch.cuda.max_memory_allocated) of one engine RLR update with `options`."""
    dev = device.torch_device
    x_T = torch.randn(batch, 4, models.latent_size, models.latent_size, device=dev)  # float32, as finetune draws it
    cond, negative = (torch.randn(batch, 77, models.cond_dim, device=dev, dtype=dtype) for _ in range(2))
    options = dict(options)
    reward_fn = latent_reward_fn(models, batch, decode_chunk=options.pop("decode_chunk"),
                                 checkpoint_vae=options.pop("checkpoint_vae"))

    def update():  # in finetune's precision: the UNet under autocast (the decode leaves it), as planned
        zero_grads(models.unet)
        with torch.autocast("cuda", dtype=dtype):
            traj = rollout(models.unet, models.scheduler, x_T, num_steps=steps, eta=1.0, encoder_hidden_states=cond,
                           negative_encoder_hidden_states=negative, guidance_scale=GUIDANCE,
                           split_cfg=options["split_cfg"])
            estimate(models.unet, traj, reward_fn, method="rlr", first_order_steps=1, h=h, **options)

    torch.cuda.empty_cache()
    return peak_memory(update, device) / 2**30


def naive_steps_that_fit(total_gib: float, steps: int) -> int:
    """The largest T (of steps, 20, 10, 5) whose naive one-graph update the planner estimates below 80%
    of the GPU's memory: the naive graph keeps all T steps, so at T = 50 it does not fit one GPU."""
    for T in (steps, 20, 10, 5):
        fastest = sd14_plan(num_steps=T)
        if naive_estimate_bytes(fastest, planner.default_table()) < 0.8 * total_gib * 2**30:
            return T
    return 5


def kernel_section(b: Bench, elements: int) -> float:
    """The fused DDIM step (with CFG) forward and backward: GB/s of the bytes it must move."""
    dev, dt = b.device.torch_device, b.dtype
    batch = 8
    shape = (batch, elements // batch)
    x, u, c, noise = (torch.randn(shape, device=dev, dtype=dt) for _ in range(4))
    coef = [torch.rand(batch, device=dev, dtype=torch.float64) for _ in range(3)]
    nbytes = x.numel() * x.element_size()
    backend = resolve_backend(x.device)
    shapes = f"{batch} x {elements // batch} elements, with CFG"
    # forward reads x, u, c, noise and writes prev and mean; backward reads the two cotangents and the
    # noise and writes the gradients of x, u, c and noise (the per-sample log-densities are negligible)
    fwd = b.time("kernel", f"ddim_step forward [{backend}]", lambda: ddim_step(
        x, u, noise, *coef, model_output_cond=c, guidance_scale=GUIDANCE), shapes=shapes, bytes_moved=6 * nbytes)
    b.time("kernel", "ddim_step forward [unfused PyTorch reference]", lambda: ddim_step_reference(
        x, u, noise, *coef, c, GUIDANCE), shapes=shapes, bytes_moved=6 * nbytes)
    leaves = [t.clone().requires_grad_(True) for t in (x, u, c, noise)]
    prev, mean, logp = ddim_step(leaves[0], leaves[1], leaves[3], *coef, model_output_cond=leaves[2],
                                 guidance_scale=GUIDANCE)
    g_prev, g_mean, g_logp = torch.randn_like(prev), torch.randn_like(mean), torch.randn_like(logp)
    bwd = b.time("kernel", f"ddim_step backward [{backend}]", lambda: torch.autograd.grad(
        (prev, mean, logp), leaves, (g_prev, g_mean, g_logp), retain_graph=True), shapes=shapes,
        bytes_moved=7 * nbytes)
    return min(fwd.get("fraction_of_bandwidth", 0.0), bwd.get("fraction_of_bandwidth", 0.0)) or None


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


def verdict(name: str, value, target: float, higher_is_better: bool, unit: str = "", note: str = "") -> str:
    if value is None:
        return f"{name}: not measured{note}"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return f"{name}: {value:.3g}{unit} (target {'>=' if higher_is_better else '<='} {target:g}{unit}) -> pass{note}"
    miss = (target - value) if higher_is_better else (value - target)
    return (f"{name}: {value:.3g}{unit} (target {'>=' if higher_is_better else '<='} {target:g}{unit}) -> MISS by "
            f"{miss:.3g}{unit} ({miss / target:.0%}){note}")


def _naive_note(update: dict) -> str:
    if "flop_bound" not in update:
        return " (the naive one-graph update did not fit the GPU at any T tried)"
    return (f" at T = {update['naive_steps']}; bound: naive FLOPs / engine FLOPs = {update['flop_bound']:.2f}x, so at "
            "equal efficiency the engine is slower (it recomputes each differentiated step) and wins on memory: "
            "O(1) steps alive instead of O(T) (bench/memory.py)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny SD (the only choice without a GPU)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    device = current_device()
    tiny = args.tiny or not device.is_cuda
    dtype = torch.float16 if device.is_cuda else torch.float32
    repeats = args.repeats or (3 if not device.is_cuda else 10)
    b = Bench(device, dtype, repeats=repeats, warmup=1 if not device.is_cuda else 3)

    print(f"device: {device.name}; torch {torch.__version__}; dtype {dtype}; "
          f"peak {device.peak_tflops or 'n/a'} TFLOP/s, {device.peak_gbps or 'n/a'} GB/s", flush=True)
    error = check_naive_matches_engine()
    print(f"check: naive one-graph RLR gradient vs rlr_fast (tiny SD, fp32, CPU): max rel diff {error:.2e}",
          flush=True)
    if not error < 1e-4:
        raise SystemExit("the naive baseline does not compute the engine's estimator; timings would be meaningless")

    models = build_models(device, tiny=tiny, dtype=dtype)
    print(f"models: {models.description}", flush=True)
    ratios = rollout_section(b, models, steps=50)
    if tiny:
        update = update_section(b, models, steps=20, batch=2, h=4, estimate_options={}, naive=True, others=True)
    else:
        # the engine with the fastest options that fit 80% of the GPU; the naive baseline at the
        # largest T that fits it, the engine timed again at that T for the ratio
        total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        options = engine_options(sd14_plan(0.8 * total_gib))
        update = update_section(b, models, steps=50, batch=2, h=4, estimate_options=options, naive=False,
                                others=True)
        naive_steps = naive_steps_that_fit(total_gib, 50)
        update.update(update_section(b, models, steps=naive_steps, batch=2, h=4, estimate_options=options,
                                     naive=True, others=False))
        target_plan = sd14_plan(TARGETS["peak_memory_gib"])
        update["peak_gib"] = peak_of_rlr_update(device, models, dtype, engine_options(target_plan))
        update["peak_estimated_gib"] = target_plan.peak_gib
    kernel_fraction = kernel_section(b, elements=(1 << 22) if not device.is_cuda else (1 << 26))

    on_cpu = "" if device.is_cuda else " [CPU, tiny SD: the targets are for a GPU]"
    if device.is_cuda:
        peak = update.get("peak_gib")
        peak_note = (f" (measured with the options of rlr_fast.plan's {TARGETS['peak_memory_gib']:g} GiB plan, "
                     f"which estimated {update['peak_estimated_gib']:.2f} GiB)")
    else:
        peak = sd14_plan(TARGETS["peak_memory_gib"]).peak_gib
        peak_note = " (ESTIMATED by rlr_fast.plan for SD1.4; not measured: no GPU in this session)"
    lines = [verdict("rollout speed-up vs diffusers loop, batch 1", ratios.get(1), TARGETS["rollout_vs_diffusers_b1"],
                     True, "x", on_cpu),
             f"rollout speed-up vs diffusers loop, batch 4: {ratios.get(4):.3g}x (no target){on_cpu}",
             verdict("update speed-up vs naive one-graph RLR", update.get("update_vs_naive"),
                     TARGETS["update_vs_naive"], True, "x", on_cpu + _naive_note(update)),
             verdict("fused kernel fraction of peak bandwidth", kernel_fraction, TARGETS["kernel_bandwidth_fraction"],
                     True, "", "" if device.is_cuda else " (no GPU in this session; CPU bandwidth peak unknown)"),
             verdict("peak memory of the SD1.4 RLR update", peak, TARGETS["peak_memory_gib"], False, " GiB",
                     peak_note)]
    header = [f"# Speed — {device.name}", "",
              f"torch {torch.__version__}, dtype {dtype}, {models.description}; medians of {repeats} repeats after "
              f"warm-up; peak {device.peak_tflops or 'n/a'} TFLOP/s dense fp16, {device.peak_gbps or 'n/a'} GB/s.",
              f"Naive-vs-engine gradient check (tiny SD, fp32, CPU): max relative difference {error:.2e}.", ""]
    if not device.is_cuda:
        header += ["**CPU run** (no GPU in this session): every figure below is a CPU figure on the tiny SD; it",
                   "exercises the code paths and says nothing about GPU speed. GPU figures: not measured.", ""]
    header += ["## Targets", ""] + [f"- {line}" for line in lines] + ["", "## Measurements"]
    csv_path, md_path = write_results(device.label, b.rows, "\n".join(header))
    print("\n".join(lines))
    print(f"wrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
