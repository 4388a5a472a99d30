"""What the whole-run tests share: a run killed at a step and resumed from its checkpoint, and the
records and LoRA that must come out the same as an uninterrupted run's."""

import json

import pytest
import safetensors.torch
import torch

from rlr_fast.train import finetune


def killed_and_resumed(out_dir, kill_step: int = 3, **kw):
    """`finetune(**kw)` into `out_dir`, killed (an exception from the step callback) at `kill_step`, then
    resumed; the resumed run's result."""
    def kill(step, record):
        if step == kill_step:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(out_dir=str(out_dir), callback=kill, **kw)
    return finetune(resume=str(out_dir))


def rewards_and_lora(result) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A finished run's reward per step (metrics.jsonl) and its final LoRA tensors."""
    lines = (result.out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["reward_mean"] for line in lines], safetensors.torch.load_file(str(result.lora_path))


def assert_same_run(a, b, steps: int) -> None:
    """Two finished runs have the same `steps` rewards and bit-identical LoRAs."""
    (r_a, lora_a), (r_b, lora_b) = rewards_and_lora(a), rewards_and_lora(b)
    assert len(r_a) == steps and r_a == r_b
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
