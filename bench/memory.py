"""Peak memory of one update, per estimator and for a naive one-graph implementation, over T and h.

    python bench/memory.py           # on a GPU: measured (torch.cuda.max_memory_allocated), SD1.4
    python bench/memory.py --cpu     # on a CPU: estimated for SD1.4 + measured on the tiny SD

On a CPU, SD1.4's numbers are ESTIMATES from rlr_fast.plan (meta-device measurements of the real
architecture; no GPU figure is invented), in float16 (as finetune runs on a GPU: UNet under
autocast, VAE decode and reward network in float16 outside it) and in float32; the tiny SD's are
measured live tensor bytes of a real update (rlr_fast.plan.measure on real CPU tensors) and show
how each estimator's memory grows with T. On a GPU the SD1.4 numbers are measured, with the UNet
under autocast as finetune runs it. The last line printed is `peak_gib=<value> (ESTIMATED|MEASURED)`
for the SD1.4 RLR update of the issue (512 px, T = 50, CFG 7.5, batch 2, LoRA rank 4, h = 4,
float16) under the plan for a 4 GiB budget.

Results: bench/results/memory_<device>.md and .csv.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (build_models, current_device, latent_reward_fn, naive_rlr_update,  # noqa: E402
                          peak_memory, write_results, zero_grads)
from rlr_fast import estimate, rollout  # noqa: E402
from rlr_fast.options import MEMORY_OPTIONS, METHODS, read_by, uses  # noqa: E402

planner = importlib.import_module("rlr_fast.plan")  # rlr_fast.plan itself is bound to the function

GIB = 2**30
# The case, on the sd14 preset (float16 weights, reward network in float16).
CASE = dict(resolution=512, batch_size=2, num_steps=50, guidance_scale=7.5, method="rlr", first_order_steps=1, h=4,
            lora_rank=4)
# Each precision's run: float16 as finetune runs on a GPU, and float32 throughout.
PRECISIONS = {"float16": dict(dtype="float16", reward_kwargs={"dtype": "float16"}),
              "float32": dict(dtype="float32", reward_kwargs={"dtype": "float32"})}
BUDGET_GIB = 4.0


def sd14_plan(budget=None, **settings) -> "planner.Plan":
    """The plan for the SD1.4 case with `settings` (the estimator options the method reads), or the smallest plan
    when nothing fits `budget`."""
    try:
        return planner.plan("sd14", budget, model="sd14", **read_by(settings.get("method", CASE["method"]),
                                                                    {**CASE, **settings}))
    except planner.PlanError as e:
        return e.smallest


def engine_options(p: "planner.Plan") -> dict:
    """A plan's options as bench.common.latent_reward_fn and estimate(...) take them."""
    return {k: p.options[k] for k in MEMORY_OPTIONS + ("decode_chunk", "checkpoint_vae")}


def estimator_options(method: str, h: int) -> dict:
    return {"rlr": dict(first_order_steps=1, h=h), "truncated_bp": dict(truncated_bp_k=1)}.get(method, {})


def naive_estimate_bytes(p: "planner.Plan", table: "planner.MeasurementTable") -> int:
    """The naive one-graph RLR update: the resident bytes, every one of the T steps' saved
    activations (nothing is freed before the single backward), and the VAE + reward graph."""
    run, cfg = p.run, p.config
    B, hw = cfg.batch_size, run.latent_hw
    per_step = table.unet_phase(run.ids["unet"], run.components["unet"], B, hw, autocast=run.autocast,
                                attention=run.attention, lora_rank=cfg.lora_rank,
                                cfg_mode="together" if run.guidance else "none", grad="input", checkpoint=False,
                                saved=True)
    decode = table.decode_phase(run.ids["vae"], run.components["vae"], B, B, hw, dtype=run.weight_dtype,
                                attention=run.attention, grad=True, checkpoint_vae=False)
    network = table.reward_network(run.reward, B, run.image_hw, dtype=run.reward_dtype, attention=run.attention,
                                   grad=True, checkpoint=False)
    resident = sum(v for k, v in p.breakdown.items() if k in ("parameters", "optimizer_state", "trajectory"))
    return resident + cfg.num_steps * per_step + max(decode.peak_bytes, decode.saved_bytes + network)


def sweep_cases(quick: bool):
    steps = (10, 50) if quick else (10, 20, 50)
    hs = (1, 4) if quick else (1, 2, 4, 8)
    for T in steps:
        for method in METHODS:
            for h in (hs if method == "rlr" else (None,)):
                yield T, method, h


def estimated_rows(quick: bool) -> list[dict]:
    """SD1.4, estimated by the planner in each precision: the plan for the budget (or the smallest
    plan) and the fastest plan."""
    table = planner.default_table()
    rows = []
    for precision, settings in PRECISIONS.items():
        for T, method, h in sweep_cases(quick):
            case = dict(settings, num_steps=T, method=method, h=h or CASE["h"])
            if method in ("ddpo", "grpo"):  # an optimizer step accumulates grad_accum of its 2 minibatches
                case["grad_accum"] = 1
            fastest, budget = sd14_plan(**case), sd14_plan(BUDGET_GIB, **case)
            row = dict(source="estimated", model="SD1.4", precision=precision, method=method, T=T, h=h,
                       peak_gib_budget_plan=budget.peak_gib, plan_phase=budget.peak_phase,
                       plan_options=_short(budget.options), peak_gib_fastest_plan=fastest.peak_gib)
            if method == "rlr":
                row["naive_one_graph_gib"] = naive_estimate_bytes(fastest, table) / GIB
            rows.append(row)
    return rows


def _short(options: dict) -> str:
    names = {"max_batch": "mb", "checkpoint_unet": "ckU", "split_cfg": "split", "checkpoint_vae": "ckV",
             "decode_chunk": "dc", "free_text_encoder": "freeTE", "checkpoint_reward": "ckR"}
    return " ".join(f"{names[k]}={int(v) if isinstance(v, bool) else v}" for k, v in options.items())


def tiny_measured_rows(quick: bool) -> list[dict]:
    """The tiny SD on the CPU: live tensor bytes of one real update (rollout + reward + estimate)."""
    device = current_device(force_cpu=True)
    models = build_models(device, tiny=True, dtype=torch.float32)
    batch, rows = 2, []
    cond = torch.randn(1, 77, models.cond_dim)
    negative = torch.zeros(1, 77, models.cond_dim)
    state = [t for m in (models.unet, models.vae, models.reward) for t in list(m.parameters()) + list(m.buffers())]
    for T in ((4, 8) if quick else (4, 8, 16)):
        x_T = torch.randn(batch, 4, models.latent_size, models.latent_size, generator=torch.Generator().manual_seed(0))
        kw = dict(num_steps=T, eta=1.0, encoder_hidden_states=cond, negative_encoder_hidden_states=negative,
                  guidance_scale=7.5)
        reward_fn = latent_reward_fn(models, batch, decode_chunk=1, checkpoint_vae=True)
        for method in METHODS + ("naive_one_graph_rlr",):
            zero_grads(models.unet)
            if method == "naive_one_graph_rlr":
                def update():
                    naive_rlr_update(models.unet, models.scheduler, x_T, reward_fn, j=1, h=2, cond=cond,
                                     negative=negative, guidance_scale=7.5, num_steps=T, eta=1.0,
                                     generator=torch.Generator().manual_seed(1))
            else:
                def update(method=method):
                    traj = rollout(models.unet, models.scheduler, x_T, generator=torch.Generator().manual_seed(1), **kw)
                    # one step per likelihood-ratio call: the engine's smallest setting
                    one_step = {"max_batch": batch} if uses(method, "max_batch") else {}
                    estimate(models.unet, traj, reward_fn, method=method, generator=torch.Generator().manual_seed(2),
                             **one_step, **estimator_options(method, 2))
            m = planner.measure(update, existing=state + [x_T, cond, negative])
            rows.append(dict(source="measured (CPU, live tensor bytes)", model="tiny SD", method=method, T=T,
                             h=2 if "rlr" in method else None, peak_mib=m.peak_bytes / 2**20))
    return rows


def show(row: dict) -> None:
    print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def measure_row(row: dict, update, device) -> None:
    """The row's peak_gib (max_memory_allocated) and reserved_gib (max_memory_reserved) of one update."""
    try:
        allocated, reserved = peak_memory(update, device)
        row.update(peak_gib=allocated / GIB, reserved_gib=reserved / GIB)
    except torch.cuda.OutOfMemoryError:
        row["peak_gib"] = "OOM"
    torch.cuda.empty_cache()


def gpu_measured_rows(quick: bool, save) -> tuple[list[dict], float]:
    """SD1.4 with random weights on the GPU: torch.cuda.max_memory_allocated of one whole update
    (rollout, reward, estimate, AdamW step) with the options of the 4 GiB plan, in float16 with the
    UNet under autocast as finetune runs it. The goal's case runs first, and save(rows) writes the
    results after every row, so a run cut short keeps what it measured."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlr_fast.models import sd14_config

    device = current_device()
    models = build_models(device, tiny=False, dtype=torch.float16)
    text_encoder = CLIPTextModel(CLIPTextConfig(**sd14_config()["text_encoder"])).to(device.torch_device, torch.float16)
    optimizer = torch.optim.AdamW([p for p in models.unet.parameters() if p.requires_grad], lr=1e-4)
    batch, rows, case_peak = CASE["batch_size"], [], None
    cond = torch.randn(batch, 77, models.cond_dim, device=device.torch_device, dtype=torch.float16)
    negative = torch.randn(batch, 77, models.cond_dim, device=device.torch_device, dtype=torch.float16)
    total = torch.cuda.get_device_properties(0).total_memory
    goal_first = sorted(sweep_cases(quick), key=lambda c: c != (CASE["num_steps"], "rlr", CASE["h"]))
    for T, method, h in goal_first:
        chosen = sd14_plan(BUDGET_GIB, **PRECISIONS["float16"], num_steps=T, method=method, h=h or CASE["h"])
        options = chosen.options
        if options["free_text_encoder"] and text_encoder is not None:
            text_encoder = None  # what train.py does after encoding the prompts
        x_T = torch.randn(batch, 4, 64, 64, device=device.torch_device)  # float32, as the loop draws it
        reward_fn = latent_reward_fn(models, batch, decode_chunk=options["decode_chunk"],
                                     checkpoint_vae=options["checkpoint_vae"])

        def update():
            with torch.autocast("cuda", dtype=torch.float16):
                traj = rollout(models.unet, models.scheduler, x_T, num_steps=T, eta=1.0, encoder_hidden_states=cond,
                               negative_encoder_hidden_states=negative, guidance_scale=7.5,
                               split_cfg=options["split_cfg"])
                estimate(models.unet, traj, reward_fn, chosen.estimator_options())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        row = dict(source="measured (GPU, max_memory_allocated)", model="SD1.4 random weights", method=method, T=T,
                   h=h, plan_options=_short(options), estimated_gib=chosen.peak_gib)
        measure_row(row, update, device)
        if method == "rlr" and T == CASE["num_steps"] and h == CASE["h"]:
            case_peak = row["peak_gib"]
        rows.append(row)
        show(row)
        save(rows)
        if method == "rlr":
            naive = naive_estimate_bytes(sd14_plan(**PRECISIONS["float16"], num_steps=T, h=h),
                                         planner.default_table())
            row = dict(source="measured (GPU, max_memory_allocated)", model="SD1.4 random weights",
                       method="naive_one_graph_rlr", T=T, h=h, estimated_gib=naive / GIB)
            if naive > 0.9 * total:
                row["peak_gib"] = f"not run: estimated {naive / GIB:.1f} GiB > device memory"
            else:
                def naive_update():
                    with torch.autocast("cuda", dtype=torch.float16):
                        naive_rlr_update(models.unet, models.scheduler, x_T, reward_fn, j=1, h=h, cond=cond,
                                         negative=negative, guidance_scale=7.5, num_steps=T, eta=1.0)
                    optimizer.zero_grad(set_to_none=True)
                measure_row(row, naive_update, device)
            rows.append(row)
            show(row)
            save(rows)
    return rows, case_peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true",
                        help="estimate SD1.4, measure the tiny SD (default without a GPU)")
    parser.add_argument("--quick", action="store_true", help="fewer T and h values")
    args = parser.parse_args(argv)
    device = current_device(force_cpu=args.cpu)
    plans = {precision: sd14_plan(BUDGET_GIB, **settings) for precision, settings in PRECISIONS.items()}
    header = [f"# Peak memory of one update — {device.name}, {date.today().isoformat()}", "",
              f"torch {torch.__version__}; SD1.4 case: 512 px, batch 2, CFG 7.5, T = 50, RLR h = 4, LoRA rank 4, "
              f"aesthetic reward (CLIP-L/14), plan for {BUDGET_GIB:g} GiB. Precision float16: weights and reward "
              "network in fp16, the UNet under CUDA autocast, the VAE decode outside it (what finetune runs on a "
              "GPU); float32: everything fp32.", ""]
    for precision, p in plans.items():
        header += ["", f"Plan for the SD1.4 RLR case in {precision}:", "", p.table()]
    if device.is_cuda:
        header.append("GPU rows are MEASURED with torch.cuda.max_memory_allocated (peak_gib, weights included) "
                      "and max_memory_reserved (reserved_gib, the caching allocator's hold).")
        rows, case_peak = gpu_measured_rows(args.quick, lambda rows: write_results(f"memory_{device.label}", rows,
                                                                                   "\n".join(header)))
        source = "MEASURED"
    else:
        rows = estimated_rows(args.quick) + tiny_measured_rows(args.quick)
        for row in rows:
            show(row)
        case_peak = plans["float16"].peak_gib
        header += ["No GPU in this session: SD1.4 rows are ESTIMATES from rlr_fast.plan (meta-device measurements",
                   "of the real architecture, tensor bytes only); GPU peak memory: not measured. Tiny-SD rows are",
                   "measured live tensor bytes of real CPU updates."]
        source = "ESTIMATED"
    csv_path, md_path = write_results(f"memory_{device.label}", rows, "\n".join(header))
    print(f"wrote {md_path} and {csv_path}")
    if isinstance(case_peak, float):
        verdict = "pass" if case_peak <= BUDGET_GIB else f"MISS by {case_peak - BUDGET_GIB:.2f} GiB"
        print(f"target peak memory <= {BUDGET_GIB:g} GiB ({source}): {case_peak:.2f} GiB -> {verdict}")
        print(f"peak_gib={case_peak:.3f} ({source})")
    else:
        print(f"target peak memory <= {BUDGET_GIB:g} GiB ({source}): {case_peak}")
        print(f"peak_gib={case_peak} ({source})")


if __name__ == "__main__":
    main()
