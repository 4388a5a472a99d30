"""Helpers shared by bench/memory.py and bench/speed.py.

Device facts (name, peak FLOP/s and bandwidth), timing (warm-up excluded, median of repeats),
result files (CSV + markdown), the models a benchmark runs (SD1.4 with random weights on a GPU,
the tiny SD on a CPU), and the baselines the engine is compared against: the naive one-graph
implementation of RLR and the DDIM step unfused.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

# where write_results puts its files; RLR_FAST_BENCH_RESULTS moves them (the dry runs of gpu_check.sh)
RESULTS = Path(os.environ.get("RLR_FAST_BENCH_RESULTS") or Path(__file__).parent / "results")

# Peak dense fp16/bf16 tensor-core throughput (TFLOP/s, without sparsity) and memory bandwidth
# (GB/s), from NVIDIA's product datasheets:
#   H100 SXM5 / H100 PCIe / H100 NVL: "NVIDIA H100 Tensor Core GPU" datasheet (FP16/BF16 Tensor Core
#     1,979 / 1,513 / 1,671 TFLOPS *with sparsity*, i.e. 989 / 756 / 835 dense; 3.35 / 2.0 / 3.9 TB/s)
#   H200 SXM: "NVIDIA H200 Tensor Core GPU" datasheet (1,979 TFLOPS with sparsity -> 989 dense; 4.8 TB/s)
#   A100 SXM4 80GB / 40GB, A100 PCIe 80GB / 40GB: "NVIDIA A100 Tensor Core GPU" datasheet (312 TFLOPS
#     dense; 2,039 / 1,555 / 1,935 / 1,555 GB/s)
# Keys are matched against torch.cuda.get_device_name(); the first match wins.
DEVICE_PEAKS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 4800.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),  # "NVIDIA H100 80GB HBM3" is the SXM5 part
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100-SXM4-40GB", 312.0, 1555.0),
    ("A100 80GB PCIe", 312.0, 1935.0),
    ("A100-PCIE-40GB", 312.0, 1555.0),
]


@dataclass(frozen=True)
class Device:
    name: str  # what torch reports (GPU) or the CPU model
    label: str  # file-name-safe, e.g. NVIDIA_H100_80GB_HBM3 or cpu
    torch_device: torch.device
    peak_tflops: Optional[float]  # dense fp16/bf16; None when unknown (CPU, unlisted GPU)
    peak_gbps: Optional[float]

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"


def current_device(force_cpu: bool = False) -> Device:
    if torch.cuda.is_available() and not force_cpu:
        name = torch.cuda.get_device_name()
        peak = next(((f, b) for key, f, b in DEVICE_PEAKS if key in name), (None, None))
        return Device(name, re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"), torch.device("cuda"), *peak)
    cpu = platform.processor() or platform.machine()
    return Device(f"CPU ({cpu}, {torch.get_num_threads()} threads)", "cpu", torch.device("cpu"), None, None)


def synchronize(device: Device) -> None:
    if device.is_cuda:
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], device: Device, *, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Seconds of each of `repeats` calls of fn() after `warmup` calls (not timed), synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def flops_of(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn (torch.utils.flop_counter; matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def peak_memory(fn: Callable[[], object], device: Device) -> tuple[int, int]:
    """(torch.cuda.max_memory_allocated, max_memory_reserved) during one call of fn: everything
    allocated at the peak, the resident weights included (as the planner's estimate counts them),
    and what the caching allocator held from the device for it (what another process could not use)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def write_results(stem: str, rows: list[dict], header: str) -> tuple[Path, Path]:
    """bench/results/<stem>.csv and .md (the header above a markdown table of the rows)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path, md_path = RESULTS / f"{stem}.csv", RESULTS / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = [header.rstrip(), "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ----------------------------------------------------------------------------------------------
# Models for the benchmarks


@dataclass
class BenchModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    reward: torch.nn.Module  # reward(images, prompts) -> (B,)
    scheduler: object
    cond_dim: int
    latent_size: int
    description: str


def build_models(device: Device, *, tiny: bool, dtype: torch.dtype, lora_rank: int = 4, seed: int = 0) -> BenchModels:
    """SD1.4's UNet and VAE and the aesthetic reward's network with random weights (speed and memory do
    not depend on the weights), or the tiny SD with a pixel reward; LoRA added, in fp32 as train.py has it."""
    from rlr_fast.models import sd14_config, tiny_sd
    from rlr_fast.lora import add_lora
    from rlr_fast.plan import PixelReward, aesthetic_architecture

    torch.manual_seed(seed)
    if tiny:
        models = tiny_sd(seed)
        unet, vae, scheduler, reward = models.unet, models.vae, models.scheduler, PixelReward()
        description = "tiny SD (toy-width SD1.4 block types), pixel-mean reward"
    else:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        config = sd14_config()
        with torch.device(device.torch_device):
            unet = UNet2DConditionModel(**config["unet"])
            vae = AutoencoderKL(**config["vae"])
            reward = aesthetic_architecture()
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1)
        description = "SD1.4 UNet + VAE + CLIP-L/14 aesthetic architecture, random weights"
    unet = unet.to(device.torch_device, dtype).eval().requires_grad_(False)
    vae = vae.to(device.torch_device, dtype).eval().requires_grad_(False)
    reward = reward.to(device.torch_device, dtype).eval().requires_grad_(False)
    add_lora(unet, rank=lora_rank, alpha=lora_rank, seed=seed)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return BenchModels(unet, vae, reward, scheduler, unet.config.cross_attention_dim, unet.config.sample_size,
                       description)


def latent_reward_fn(models: BenchModels, batch: int, *, decode_chunk: int = 1, checkpoint_vae: bool = True):
    """x0 latents -> (B,) through the VAE decode and the reward, as training builds it."""
    from rlr_fast.rewards.latent import LatentReward

    from rlr_fast.plan import as_unchecked_reward

    return LatentReward(models.vae, as_unchecked_reward(models.reward), ["a prompt"] * batch,
                        decode_chunk=decode_chunk, checkpoint_vae=checkpoint_vae)


# ----------------------------------------------------------------------------------------------
# The naive baseline: the whole chain in one autograd graph


def naive_rlr_update(model, scheduler, x_T: torch.Tensor, reward_fn, *, num_steps: int, eta: float, j: int,
                     first_order_steps: int = 1, h: int = 2, cond=None, negative=None, guidance_scale: float = 1.0,
                     generator=None) -> torch.Tensor:
    """The RLR estimate (docs/estimator.md §3-4, baseline 0, no rescaling) the way a straightforward
    implementation computes it: sample the chain WITH grad, keep every step's graph, assemble one
    surrogate loss and call backward once. Accumulates the same gradient as
    `rollout` + `estimate(method="rlr", j=j)` into `.grad`; returns the rewards.

    Memory grows with T (every step's activations stay alive until the backward); this is the
    baseline bench/memory.py and bench/speed.py compare the engine against.
    """
    from rlr_fast.ddim import ddim_step
    from rlr_fast.rollout import predict
    from rlr_fast.samplers import step_coefficients

    f, T, batch = first_order_steps, num_steps, x_T.shape[0]
    scheduler.set_timesteps(num_steps)
    coef = step_coefficients(scheduler, eta)
    device = x_T.device
    # drawn as rlr_fast.rollout draws them, so the same generator gives the same chain
    noises = torch.randn((T,) + tuple(x_T.shape), generator=generator,
                         device=device if generator is None else generator.device, dtype=x_T.dtype).to(device)
    if cond is not None and cond.shape[0] == 1:
        cond = cond.expand(batch, -1, -1)
    if negative is not None and negative.shape[0] == 1:
        negative = negative.expand(batch, -1, -1)
    x = x_T
    lr_terms = []  # (mean of step t, its cotangent direction eps_t / sigma_t, weight)
    for k in range(T):
        t = T - k  # the math index of docs/estimator.md §1
        in_first_order_chain = t < f  # steps f-1 .. 1 continue the chain from step f
        in_half_order_chain = j + 1 <= t < j + h  # steps j+h-1 .. j+1 continue from step j+h
        x_in = x if (in_first_order_chain or in_half_order_chain) else x.detach()
        per = [v[k].expand(batch).to(device) for v in (coef.c_x, coef.c_e, coef.sigmas)]
        out, out_cond = predict(model, x_in, coef.timesteps[k].to(device), cond, negative, guidance_scale)
        x, mean, _ = ddim_step(x_in, out, noises[k], *per, model_output_cond=out_cond, guidance_scale=guidance_scale)
        is_zeroth_order = t > f and not j + 1 <= t <= j + h
        if is_zeroth_order or t == j + 1:  # C, and the likelihood ratio closing the half-order segment
            sigma = per[2].to(mean.dtype).reshape((-1,) + (1,) * (mean.dim() - 1))
            lr_terms.append((mean, noises[k] / sigma))
    x0 = x if f > 0 else x.detach()
    rewards = reward_fn(x0)
    advantage = -rewards.detach() / batch  # adv = -(R - b) / (B s), b = 0, s = 1
    loss = -rewards.sum() / batch if f > 0 else x0.new_zeros(())
    for mean, direction in lr_terms:
        loss = loss + (advantage.reshape((-1,) + (1,) * (mean.dim() - 1)).to(mean.dtype) * direction * mean).sum()
    loss.backward()
    return rewards.detach()


def lora_grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def max_rel_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    num = max(float((x - y).abs().max()) for x, y in zip(a, b))
    den = max(float(y.abs().max()) for y in b)
    return num / den if den > 0 else math.inf


# ----------------------------------------------------------------------------------------------
# The fused DDIM step's baseline


def unfused_ddim_step(x, u, noise, c_x, c_e, sigma, c, w):
    """The step as plain PyTorch ops in the inputs' dtype, one kernel per op (the way a scheduler's
    step and a separate log-density compute it): the baseline of the fused kernels."""
    def col(v):
        return v.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    e = u + w * (c - u)
    mean = col(c_x) * x + col(c_e) * e
    prev = mean + col(sigma) * noise
    logp = -0.5 * noise.float().pow(2).flatten(1).sum(1) - noise[0].numel() * (
        sigma.float().log() + 0.5 * math.log(2 * math.pi))
    return prev, mean, logp
