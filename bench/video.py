"""Text-to-video updates on the tiny random video UNets: memory flat in T, and time per update.

    python bench/video.py            # both tiny video UNets (ModelScope UNet3D, AnimateDiff motion)

For T in (5, 10, 20) DDIM steps, batch 2, F = 8 frames of 8x8 latents, LoRA rank 4 on every
attention projection (spatial and temporal): the peak bytes saved for backward at once
(`estimate(track_memory=True)`, parameters and the stored trajectory excluded) of an RLR update
(h = 2) and of full backprop through the sweep, against the naive one-graph backprop
(rlr_fast.testing.naive_backprop), and the median seconds of an RLR update and of a rollout
(3 repeats after one warm-up). Results: bench/results/video_<device>.md and .csv.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import current_device, median, time_it, write_results  # noqa: E402
from rlr_fast import estimate, rollout  # noqa: E402
from rlr_fast.lora import lora_parameters  # noqa: E402
from rlr_fast.lora import add_lora
from rlr_fast.testing import make_scheduler, naive_backprop  # noqa: E402
from rlr_fast.video import tiny_video_unet  # noqa: E402

FRAMES, BATCH, STEPS = 8, 2, (5, 10, 20)


def reward(x0: torch.Tensor) -> torch.Tensor:
    return -x0.float().pow(2).flatten(1).mean(1)


def measure(kind: str, device) -> list[dict]:
    unet = add_lora(tiny_video_unet(kind).to(device.torch_device), rank=4, alpha=4, seed=0)
    for p in lora_parameters(unet):  # non-zero lora_B, as after training
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(BATCH, 4, FRAMES, 8, 8, generator=g).to(device.torch_device)
    cond = torch.randn(BATCH, 77, unet.config.cross_attention_dim, generator=g).to(device.torch_device)
    rows = []
    for steps in STEPS:
        def sample():
            return rollout(unet, make_scheduler(), x_T, num_steps=steps, eta=1.0, encoder_hidden_states=cond,
                           generator=torch.Generator().manual_seed(1))

        traj = sample()

        def update(method: str, **options) -> dict:
            unet.zero_grad(set_to_none=True)
            return estimate(unet, traj, reward, method=method, generator=torch.Generator().manual_seed(2), **options)

        unet.zero_grad(set_to_none=True)
        naive = naive_backprop(unet, traj, reward, track_memory=True)["peak_saved_bytes"]
        rows.append({
            "unet": type(unet).__name__, "T": steps,
            "rlr_saved_MiB": update("rlr", h=2, track_memory=True)["peak_saved_bytes"] / 2**20,
            "full_bp_saved_MiB": update("full_bp", track_memory=True)["peak_saved_bytes"] / 2**20,
            "naive_saved_MiB": naive / 2**20,
            "rlr_update_s": median(time_it(lambda: update("rlr", h=2), device, repeats=3)),
            "rollout_s": median(time_it(sample, device, repeats=3)),
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        # one thread: on a CPU shared with other jobs, OpenMP threads spinning for cores cost 30x
        torch.set_num_threads(1)
    device = current_device()
    rows = measure("modelscope", device) + measure("animatediff", device)
    header = (f"# Text-to-video updates on the tiny video UNets — {device.name}\n\n"
              f"{datetime.date.today().isoformat()}, torch {torch.__version__}, float32. Batch {BATCH}, "
              f"{FRAMES} frames of 8x8 latents (B, C, F, H, W) = ({BATCH}, 4, {FRAMES}, 8, 8), LoRA rank 4 "
              "on every attention projection, random weights (rlr_fast.video.tiny_video_unet). *_saved_MiB: "
              "peak bytes saved for backward at once (parameters and the stored trajectory excluded); "
              "naive: one autograd graph over the T steps. Times: median of 3 after one warm-up.")
    for path in write_results(f"video_{device.label}", rows, header):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
