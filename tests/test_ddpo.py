"""DDPO as it is run, through finetune: epochs reused for several optimizer steps (on-policy first,
then off-policy with the clip acting), the reward queried once per sampled image, per-prompt
advantages from the reward history, and bit-exact resume from a checkpoint taken mid-epoch."""

import json

import pytest
import safetensors.torch
import torch

from rlr_fast.checkpoint import find_checkpoint
from rlr_fast.config import Config
from rlr_fast.train import finetune

T, B = 3, 4


@pytest.fixture(scope="module")
def ddpo(tiny_folder):
    """Epochs of 2 rollout batches x 4 samples, 2 passes of 4 minibatches of 2: 8 optimizer steps an epoch."""
    return dict(model=str(tiny_folder), num_steps=T, batch_size=B, images_per_prompt=2, sample_prompts=0,
                tensorboard=False, warmup_steps=0, lr=1e-3, method="ddpo", reward="brightness",
                ddpo_rollout_batches=2, ddpo_minibatches=4, ddpo_inner_epochs=2)


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(ddpo, tmp_path_factory):
    """10 steps: one whole epoch and the first 2 steps of the next."""
    return finetune(out_dir=str(tmp_path_factory.mktemp("ddpo")), train_steps=10, checkpoint_every=3, **ddpo)


@pytest.mark.slow
def test_an_epoch_is_sampled_once_then_reused_off_policy(straight):
    rows = records(straight.out_dir)
    epoch_starts = [1, 9]
    for r in rows:
        est, first = r["estimator"], r["step"] in epoch_starts
        # the reward is queried once per sampled image, when the epoch is drawn
        assert r["reward_queries"] == r["reward_images"] == (2 * B if first else 0)
        assert (r["reward_mean"] is not None) == first
        # model work: the rollouts (T steps x 8 samples) at an epoch's start, then T steps x 2 samples per minibatch
        assert r["unet_forward_samples"] == (T * 2 * B if first else 0) + T * 2
        assert r["unet_backward_samples"] == T * 2
        if first:  # the policy that sampled the epoch: ratio 1 exactly (estimate(on_policy=True)), nothing clipped
            assert est["clip_fraction"] == 0 and est["ratio_max_deviation"] == 0
        else:  # off-policy: the ratio has moved and the clip acts
            assert est["clip_fraction"] > 0 and est["ratio_max_deviation"] > 1e-4
    assert [r["estimator"]["minibatches_left"] for r in rows[:8]] == [3, 2, 1, 0, 3, 2, 1, 0]
    assert [r["estimator"]["passes_left"] for r in rows[:8]] == [1] * 4 + [0] * 4


@pytest.mark.slow
def test_resume_from_a_checkpoint_mid_epoch_is_bit_exact(straight, ddpo, tmp_path):
    def kill_at_4(step, record):
        if step == 4:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(out_dir=str(tmp_path), train_steps=10, checkpoint_every=3, callback=kill_at_4, **ddpo)
    checkpoint = find_checkpoint(tmp_path)
    assert checkpoint.step == 3
    tensors, meta = checkpoint.method_state()  # the epoch in progress and where in it the run was
    assert tensors["epoch/latents"].shape == (T + 1, 2 * B, 4, 8, 8) and len(meta["queue"]) == 1
    result = finetune(resume=str(tmp_path))
    a, b = records(straight.out_dir), records(result.out_dir)
    assert [r["estimator"]["approx_kl"] for r in a] == [r["estimator"]["approx_kl"] for r in b]
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    lora_a, lora_b = (safetensors.torch.load_file(str(r.lora_path)) for r in (straight, result))
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)


@pytest.mark.slow
def test_advantages_come_from_each_prompts_history(ddpo, tmp_path):
    """With min_count 2 a prompt drawn before is standardised by its own recent rewards, not the epoch's."""
    result = finetune(out_dir=str(tmp_path), train_steps=16, ddpo_buffer_size=4, ddpo_min_count=2,
                      ddpo_inner_epochs=1, **{k: v for k, v in ddpo.items() if k != "ddpo_inner_epochs"})
    state = find_checkpoint(result.out_dir).method_state()[1]
    buffers = state["history"]["buffers"]
    assert buffers and all(1 <= len(v) <= 4 for v in buffers.values())
    assert sum(len(v) for v in buffers.values()) <= 4 * 2 * B  # 4 epochs of 8 rewards, at most 4 kept per prompt


@pytest.mark.slow
def test_a_nonfinite_reward_skips_the_step_and_drops_the_epoch(ddpo, tmp_path):
    calls = []

    def flaky(images, prompts):
        calls.append(len(images))
        values = images.mean(dim=(1, 2, 3))
        return values * float("nan") if len(calls) == 1 else values

    result = finetune(out_dir=str(tmp_path), train_steps=3, **dict(ddpo, reward=flaky))
    rows = records(result.out_dir)
    assert [r["skipped"] for r in rows] == ["reward", False, False]
    assert rows[0]["reward_queries"] == B and rows[1]["reward_queries"] == 2 * B  # the whole new epoch


@pytest.mark.parametrize("change, message", [
    (dict(ddpo_minibatches=3), "ddpo_minibatches=3 must divide the 8 samples of an epoch"),
    (dict(grad_accum=3, ddpo_minibatches=4), "grad_accum=3 must divide ddpo_minibatches=4"),
    (dict(ddpo_min_count=20), "ddpo_min_count=20 must be <= ddpo_buffer_size=16"),
    (dict(ddpo_inner_epochs=0), "ddpo_inner_epochs must be >= 1, got 0"),
])
def test_bad_ddpo_settings_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        Config(method="ddpo", batch_size=4, ddpo_rollout_batches=2).with_overrides(change)
