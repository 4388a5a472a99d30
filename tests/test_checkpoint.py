"""Checkpoints: exact round trip of LoRA, AdamW and RNG states and the metrics records; checksums that
catch damage; the newest readable checkpoint of a run found past damaged ones, and only inside a run
folder of ours; a bulky method state stored once; the newest few kept."""

import json
import random
import shutil

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from rlr_fast.checkpoint import capture_rng, find_checkpoint, prune_checkpoints, read_checkpoint, restore_checkpoint, \
    restore_rng, save_checkpoint
from rlr_fast.config import Config
from rlr_fast.lora import add_lora, lora_parameters
from rlr_fast.run_dir import mark
from rlr_fast.testing import make_unet

LORA = "lora/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight"


def trained(seed: int):
    """A tiny UNet with a LoRA and an AdamW that has taken one step (so it holds state)."""
    unet = add_lora(make_unet(), seed=seed)
    params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    sum(((p - 1) ** 2).sum() for p in params).backward()
    optimizer.step()
    return unet, optimizer


RECORDS = [{"step": 1, "reward_mean": 0.25, "kl": float("nan")}, {"step": 2, "reward_mean": None, "skipped": "reward"},
           {"step": 3, "estimator": {"j": 1, "term_norms": {"total": 1e-30}}}]


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of step 3 in a run folder (marked by its run)."""
    mark(tmp_path)
    unet, optimizer = trained(seed=0)
    generators = {"sampling": torch.Generator().manual_seed(7)}
    path = save_checkpoint(tmp_path / "checkpoints" / "step_000003.safetensors", step=3, cfg=Config(), unet=unet,
                           optimizer=optimizer, rng=capture_rng(generators),
                           counters={"consecutive_nonfinite": 0, "seconds": 1.5}, records=RECORDS)
    return path, unet, optimizer


def test_round_trip_restores_lora_optimizer_and_every_rng(saved):
    path, unet, optimizer = saved
    expected = (torch.rand(3), np.random.rand(), random.random(), torch.Generator().manual_seed(7).initial_seed())
    np.random.seed(5), random.seed(5), torch.manual_seed(5)  # move every global RNG away from the saved state
    fresh, fresh_optimizer = trained(seed=1)
    generators = {"sampling": torch.Generator().manual_seed(0)}
    checkpoint = read_checkpoint(path)
    restore_rng(restore_checkpoint(checkpoint, fresh, fresh_optimizer), generators)
    assert checkpoint.step == 3 and checkpoint.meta["counters"]["seconds"] == 1.5
    assert json.dumps(checkpoint.records()) == json.dumps(RECORDS)  # NaN included
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(unet), lora_parameters(fresh)))
    saved_state, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved_state[i][k], restored[i][k]) for i in saved_state for k in saved_state[i])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]
    assert torch.equal(torch.randn(4, generator=generators["sampling"]),
                       torch.randn(4, generator=torch.Generator().manual_seed(7)))


def test_a_flipped_exponent_bit_in_a_lora_tensor_is_detected(saved, corrupt_tensor):
    path = saved[0]
    clean = safetensors.torch.load_file(str(path))[LORA].clone()  # load_file maps the file
    corrupt_tensor(path, LORA)
    damaged = safetensors.torch.load_file(str(path))[LORA]
    assert not torch.equal(clean, damaged)  # the damage is real, and a plain load does not notice
    with pytest.raises(ValueError, match=rf"step_000003.safetensors is corrupt: tensor '{LORA}' do not match"):
        read_checkpoint(path)


def test_random_bytes_in_the_rng_state_are_one_clear_error(saved, corrupt_tensor):
    corrupt_tensor(saved[0], "rng/torch_cpu", how="random")
    with pytest.raises(ValueError, match=r"is corrupt: tensor 'rng/torch_cpu'") as error:
        read_checkpoint(saved[0])
    assert "\n" not in str(error.value)


def test_edited_metadata_is_detected(saved):
    path = saved[0]
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["rlr_fast"]), {k: f.get_tensor(k) for k in f.keys()}
    meta["step"] = 4
    safetensors.torch.save_file(tensors, str(path), metadata={"rlr_fast": json.dumps(meta)})
    with pytest.raises(ValueError, match="its metadata does not match its checksum"):
        read_checkpoint(path)


def test_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "step_000001.safetensors"
    torch.save({"lora": torch.ones(2)}, path)  # a pickle under the checkpoint's name
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        read_checkpoint(path)


def test_resume_falls_back_to_the_newest_readable_checkpoint(saved, capsys, corrupt_tensor):
    path = saved[0]
    newer = path.with_name("step_000005.safetensors")
    shutil.copy(path, newer)
    corrupt_tensor(newer, LORA)
    assert find_checkpoint(path.parent.parent).path == path
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skipping a damaged checkpoint")
    assert "step_000005.safetensors is corrupt" in err[0]

    corrupt_tensor(path, "rng/torch_cpu", how="random")
    with pytest.raises(ValueError, match=r"no readable checkpoint: .*step_000005.* is corrupt.*the 1 older one\(s\) "
                                         r"are unreadable too"):
        find_checkpoint(path.parent.parent)


def test_only_a_checkpoint_inside_a_run_folder_of_ours_is_resumed(saved, tmp_path_factory):
    path = saved[0]
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for place in (elsewhere / "step_000003.safetensors", elsewhere / "bar" / "checkpoints" / "step_000003.safetensors"):
        place.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, place)
        with pytest.raises(ValueError, match=r"is not a checkpoint in a run folder of rlr_fast .*continues only in "
                                             r"its own folder"):
            find_checkpoint(place)
    with pytest.raises(ValueError, match=r"holds files rlr_fast did not write \(bar/, step_000003.safetensors\), so "
                                         r"it is not a run folder"):
        find_checkpoint(elsewhere)
    assert find_checkpoint(path).step == 3


class BulkyState:
    """A method state too large to copy into every checkpoint (as SQDF's replay buffer)."""

    stored_once = True

    def __init__(self, value: float):
        self.value = value

    def to_checkpoint(self):
        return {"buffer": torch.full((4,), self.value)}, {"size": 4}


def test_a_bulky_method_state_is_stored_once_and_older_checkpoints_are_pruned(tmp_path, corrupt_tensor, capsys):
    mark(tmp_path)
    unet, optimizer = trained(seed=0)
    folder = tmp_path / "checkpoints"
    for step in range(1, 6):
        save_checkpoint(folder / f"step_{step:06d}.safetensors", step=step, cfg=Config(), unet=unet,
                        optimizer=optimizer, rng=capture_rng({}), counters={}, method_state=BulkyState(step))
        prune_checkpoints(folder, keep=3)
    assert sorted(p.name for p in folder.iterdir()) == [
        "state_000005.safetensors", "step_000003.safetensors", "step_000004.safetensors", "step_000005.safetensors"]
    newest = find_checkpoint(tmp_path)
    assert "method/buffer" not in newest.tensors  # the checkpoint itself holds no copy
    tensors, meta = newest.method_state()
    assert torch.equal(tensors["buffer"], torch.full((4,), 5.0)) and meta == {"size": 4}
    with pytest.raises(ValueError, match=r"step_000004.safetensors cannot be resumed: the method's state "
                                         r"state_000004.safetensors .* is gone"):
        find_checkpoint(folder / "step_000004.safetensors")

    corrupt_tensor(folder / "state_000005.safetensors", "buffer")
    with pytest.raises(ValueError, match="state_000005.safetensors is corrupt"):
        newest.method_state()


def test_pruning_never_deletes_the_newest_checkpoint_that_verifies(saved, corrupt_tensor):
    path = saved[0]
    for step in (4, 5):
        damaged = path.with_name(f"step_{step:06d}.safetensors")
        shutil.copy(path, damaged)
        corrupt_tensor(damaged, LORA)
    assert prune_checkpoints(path.parent, keep=1) == [path.with_name("step_000004.safetensors")]
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_000003.safetensors", "step_000005.safetensors"]
    assert prune_checkpoints(path.parent, keep=0) == []  # 0: keep every one
