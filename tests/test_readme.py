"""The README's Python blocks run as written, twice each (a pasted block must survive a second paste),
on the CPU: the whole-loop block with fewer steps, the SD1.4 blocks on a tiny SD1.4-shaped folder, with
only the replacements below (the folder, the device and dtype, a reward without weights, fewer steps)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SD14_FOLDER = "path/to/stable-diffusion-v1-4"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def block_with(needle: str) -> str:
    found = [b for b in python_blocks() if needle in b]
    assert len(found) == 1, f"the README has {len(found)} python blocks with {needle!r}"
    return found[0]


def on_tiny_cpu(block: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in block, f"the README block no longer holds {old!r}: update this test with it"
        block = block.replace(old, new)
    return block


def run_twice(code: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for _ in range(2):
        namespace = {"__name__": "readme"}
        exec(compile(code, str(README), "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_the_whole_loop_block_runs_twice(tmp_path, monkeypatch):
    block = on_tiny_cpu(block_with("rlr_fast.finetune("), {"train_steps=20": "train_steps=2"})  # 2 minutes less
    namespace = run_twice(block, tmp_path, monkeypatch)
    assert namespace["result"].metrics["steps"] == 2 and namespace["result"].lora_path.is_file()
    assert namespace["result"].out_dir == Path("out/api_demo")


@pytest.mark.slow
def test_the_update_by_hand_runs_the_planned_options(tiny_folder, tmp_path, monkeypatch):
    tiny = (f'rlr_fast.Config.from_preset("sd14", model={str(tiny_folder)!r}, device="cpu", dtype="float32", '
            'reward="brightness", reward_kwargs={"dtype": None}, num_steps=6)')
    # planned for SD1.4's architecture in fp16 (cached measurements; the tiny folder's take a minute to measure):
    # the tiny model then runs the options of SD1.4's 4 GiB plan
    sd14_plan = 'rlr_fast.plan(cfg.with_overrides({"dtype": "float16"}), max_memory_gb=4, model="sd14")'
    block = on_tiny_cpu(block_with("rlr_fast.plan("), {
        f'rlr_fast.Config.from_preset("sd14", model="{SD14_FOLDER}")': tiny,
        "rlr_fast.plan(cfg, max_memory_gb=4)": sd14_plan})
    namespace = run_twice(block, tmp_path, monkeypatch)
    run, plan, stats = namespace["run"], namespace["plan"], namespace["stats"]
    assert plan.options["checkpoint_unet"] and plan.options["free_text_encoder"]  # what 4 GiB needs for SD1.4
    assert (run.max_batch, run.checkpoint_unet, run.checkpoint_vae, run.decode_chunk) == tuple(
        plan.options[k] for k in ("max_batch", "checkpoint_unet", "checkpoint_vae", "decode_chunk"))
    assert namespace["sd"].text_encoder is None
    assert namespace["reward_fn"].decode_chunk == run.decode_chunk
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in namespace["params"])
    assert len(stats["rewards"]) == run.batch_size


@pytest.mark.slow
def test_the_stock_pipeline_block_loads_a_runs_lora(tiny_folder, tiny, tmp_path, monkeypatch):
    from rlr_fast.train import finetune

    finetune(out_dir=str(tmp_path / "out" / "sd14"), train_steps=1, **tiny)
    block = on_tiny_cpu(block_with("load_lora_weights"), {
        SD14_FOLDER: str(tiny_folder), "torch.float16": "torch.float32", '.to("cuda")': '.to("cpu")'})
    namespace = run_twice(block, tmp_path, monkeypatch)
    assert type(namespace["pipe"].scheduler).__name__ == "DDIMScheduler"
    assert namespace["image"].size == (16, 16)  # tiny_sd's 8x8 latents
