"""What a run may touch, and that no record is lost: a folder of someone else's is refused; a checkpoint
resumes only in its own run; a failed write keeps every trained step; a resume from an earlier
checkpoint starts a branch; damaged records are rebuilt; the final LoRA is verified; a complete run
stops at once; the newest few checkpoints are kept."""

import errno
import json
import os
import pathlib
import shutil
import signal

import PIL.Image
import pytest
import safetensors.torch
import torch

from rlr_fast.checkpoint import find_checkpoint, read_checkpoint
from rlr_fast.cli import main
from rlr_fast.inference import load_for_inference
from rlr_fast.lora import LORA_WEIGHT_NAME, lora_parameters
from rlr_fast.train import StopRequested, finetune
from test_train import copy_of, records, same_lora, snapshot


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """4 steps, a checkpoint after each (the default keep_checkpoints keeps the newest 3), grids every 2."""
    return finetune(out_dir=str(tmp_path_factory.mktemp("finished") / "run"), train_steps=4, checkpoint_every=1,
                    sample_every=2, **tiny)


def tiny_argv(tiny) -> list[str]:
    """`tiny` as `rlr-fast finetune --set` arguments."""
    sets = {**tiny, "sample_seeds": list(tiny["sample_seeds"])}
    return [arg for key, value in sets.items()
            for arg in ("--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}")]


def kill_at(step):
    def callback(at, record):
        if at == step:
            raise RuntimeError("simulated kill")
    return callback


def test_a_folder_of_someone_elses_is_refused_and_left_as_it_was(tiny, tmp_path):
    out = tmp_path / "mine"
    for name in ("checkpoints/epoch=3-step=1200.ckpt", "eval/results.json", "samples/photo_of_my_cat.png", "notes.tmp"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    before = snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"holds files rlr_fast did not write \(checkpoints/, eval/, notes.tmp, "
                                             r"samples/\); a run starts only in a new or empty folder or one of "
                                             r"its own"):
            finetune(out_dir=str(out), train_steps=1, overwrite=overwrite, **tiny)
        assert snapshot(out) == before


@pytest.mark.slow
def test_a_failed_start_is_reused_without_deleting_the_users_files(tiny, tmp_path):
    def unreachable(images, prompts):
        raise RuntimeError("reward server down")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="reward server down"):
        finetune(out_dir=str(out), train_steps=2, reward=unreachable, **tiny)
    (out / "notes.txt").write_text("mine")
    (out / "samples" / "photo_of_my_cat.png").write_bytes(b"cat")
    finetune(out_dir=str(out), train_steps=1, **tiny)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "samples" / "photo_of_my_cat.png").read_bytes() == b"cat"
    assert [r["step"] for r in records(out)] == [1]


@pytest.mark.slow
def test_a_checkpoint_outside_its_run_is_not_resumed(finished, tmp_path):
    """It used to make the file's grandparent the out_dir: deleting *.tmp and .tmp* there, overwriting
    config.yaml, appending to a metrics.jsonl of someone else's."""
    root = tmp_path / "elsewhere"
    (root / "bar").mkdir(parents=True)
    shutil.copy(finished.checkpoint_path, root / "bar" / "step_000004.safetensors")
    (root / "results.tmp").write_text("x")
    (root / ".tmpcache").mkdir()
    (root / ".tmpcache" / "blob").write_text("x")
    (root / "config.yaml").write_text("mine: 1\n")
    (root / "metrics.jsonl").write_text('{"loss": 0.5}\n')
    before = snapshot(root)
    with pytest.raises(ValueError, match="is not a checkpoint in a run folder of rlr_fast"):
        finetune(resume=str(root / "bar" / "step_000004.safetensors"), train_steps=5)
    assert snapshot(root) == before


def failing_writes(monkeypatch, where: str, code: int) -> None:
    """Every write of a file whose path holds `where` fails with OSError `code` (ENOSPC: a full disk,
    EIO: a failing drive), as the system call would: images, safetensors and text files."""
    def check(path):
        if where in str(path):
            raise OSError(code, os.strerror(code))

    save_image, save_tensors = PIL.Image.Image.save, safetensors.torch.save_file
    write_text, write_bytes = pathlib.Path.write_text, pathlib.Path.write_bytes
    monkeypatch.setattr(PIL.Image.Image, "save", lambda self, fp, *a, **k: check(fp) or save_image(self, fp, *a, **k))
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda tensors, filename, *a, **k: check(filename) or save_tensors(tensors, filename, *a, **k))
    monkeypatch.setattr(pathlib.Path, "write_text", lambda self, *a, **k: check(self) or write_text(self, *a, **k))
    monkeypatch.setattr(pathlib.Path, "write_bytes", lambda self, *a, **k: check(self) or write_bytes(self, *a, **k))


@pytest.mark.parametrize("where, code, sets, failed, then", [
    # a grid at a step whose checkpoint is due: the checkpoint is written first
    ("step_000002.png", errno.ENOSPC, ["checkpoint_every=2"], "samples/step_000002.png",
     "the checkpoint of step 2 is in"),
    # no checkpoint due (the default): one is written before the run stops
    ("step_000002.png", errno.ENOSPC, [], "samples/step_000002.png",
     "checkpoint written to {out}/checkpoints/step_000002"),
    ("checkpoints/.step_000002", errno.EIO, ["checkpoint_every=2"], "checkpoints/step_000002.safetensors",
     "the checkpoint of step 2 could not be written either (Input/output error)"),
    ("config.yaml", errno.EIO, [], "config.yaml", "no step was trained"),
])
@pytest.mark.slow
def test_a_failed_write_is_one_line_after_a_checkpoint(tiny, tmp_path, monkeypatch, capsys, where, code, sets, failed,
                                                       then):
    out = tmp_path / "run"
    failing_writes(monkeypatch, where, code)
    argv = ["finetune", "--out", str(out), *tiny_argv(tiny), "--set", "train_steps=4", "--set", "sample_every=2"]
    assert main(argv + [arg for s in sets for arg in ("--set", s)]) == 1
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("rlr-fast ")]
    assert len(ours) == 1 and "Traceback" not in err, err
    assert ours[0].startswith(f"rlr-fast finetune: cannot write {out / failed}: {os.strerror(code)} "
                              f"({errno.errorcode[code]}); ")
    assert then.format(out=out) in ours[0]
    if "could not" not in then and "no step" not in then:
        assert find_checkpoint(out).step == 2 and f"resume with: rlr-fast finetune --resume {out}" in ours[0]


@pytest.mark.slow
def test_after_a_full_disk_the_run_resumes_bit_exactly(finished, tiny, tmp_path, monkeypatch):
    failing_writes(monkeypatch, "step_000002.png", errno.ENOSPC)
    with pytest.raises(RuntimeError, match="No space left on device"):
        finetune(out_dir=str(tmp_path), train_steps=4, sample_every=2, **tiny)
    monkeypatch.undo()
    result = finetune(resume=str(tmp_path))
    assert same_lora(finished.out_dir, result.out_dir)
    assert [r["reward_mean"] for r in records(tmp_path)] == [r["reward_mean"] for r in records(finished.out_dir)]


@pytest.mark.slow
def test_a_full_disk_at_the_final_lora_keeps_the_run(finished, tiny, tmp_path, monkeypatch, capsys):
    failing_writes(monkeypatch, LORA_WEIGHT_NAME, errno.ENOSPC)
    with pytest.raises(RuntimeError, match=rf"cannot write {tmp_path / LORA_WEIGHT_NAME}: No space left on device "
                                           r"\(ENOSPC\); stopped after step 4/4; the checkpoint of step 4 is in"):
        finetune(out_dir=str(tmp_path), train_steps=4, sample_every=2, **tiny)
    monkeypatch.undo()
    finetune(resume=str(tmp_path))  # writes the final outputs
    assert same_lora(finished.out_dir, tmp_path) and (tmp_path / "summary.json").is_file()


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_starts_a_branch(finished, tmp_path, capsys):
    """Checkpoints, metrics and summary agree after a resume from step 2 of a finished 4-step run that
    is killed at step 3: the next resume continues from the branch's step 3, not the old step 4."""
    run = copy_of(finished.out_dir, tmp_path)
    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(resume=str(run / "checkpoints" / "step_000002.safetensors"), callback=kill_at(3))
    moved = run / "superseded" / "from_step_000002"
    assert f"moved them (and a copy of metrics.jsonl) to {moved}" in capsys.readouterr().err
    assert sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*") if p.is_file()) == [
        "checkpoints/step_000003.safetensors", "checkpoints/step_000004.safetensors", "metrics.jsonl",
        LORA_WEIGHT_NAME, "reward_curve.png", "samples/step_000004.png", "summary.json"]
    assert len(records(moved)) == 4
    assert find_checkpoint(run).step == 3 and [r["step"] for r in records(run)] == [1, 2, 3]
    assert not (run / "summary.json").exists() and not (run / LORA_WEIGHT_NAME).exists()
    result = finetune(resume=str(run))
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4] and result.metrics["last"]["step"] == 4
    assert same_lora(finished.out_dir, run)
    assert [r["reward_mean"] for r in records(run)] == [r["reward_mean"] for r in records(finished.out_dir)]


def test_damaged_records_of_a_finished_run_are_rebuilt_from_its_checkpoint(finished, tmp_path, capsys):
    original = (finished.out_dir / "metrics.jsonl").read_text()
    lines = original.splitlines(keepends=True)
    damages = {"the last line of {log} is torn (line 4)": "".join(lines[:-1]) + lines[-1][:20],
               "{log} line 2 is not JSON": "".join(lines[:1]) + lines[1][:12] + "\n" + "".join(lines[2:]),
               "{log} is missing": None}
    for case, (said, damaged) in enumerate(damages.items()):
        run = copy_of(finished.out_dir, tmp_path / str(case))
        log = run / "metrics.jsonl"
        log.write_text(damaged) if damaged is not None else log.unlink()
        finetune(resume=str(run))
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith(said.format(log=log))]
        assert len(ours) == 1 and ours[0].endswith(f": rebuilt its 4 records up to step 4 from {run}/checkpoints/"
                                                   "step_000004.safetensors")
        assert log.read_text() == original


@pytest.mark.slow
def test_a_deleted_log_of_a_killed_run_is_rebuilt_on_resume(finished, tiny, tmp_path, capsys):
    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(out_dir=str(tmp_path), train_steps=4, sample_every=2, checkpoint_every=2, callback=kill_at(3), **tiny)
    (tmp_path / "metrics.jsonl").unlink()  # it used to resume without a word, its log starting at step 3
    finetune(resume=str(tmp_path))
    assert f"{tmp_path / 'metrics.jsonl'} is missing: rebuilt its 2 records up to step 2" in capsys.readouterr().err
    assert [r["reward_mean"] for r in records(tmp_path)] == [r["reward_mean"] for r in records(finished.out_dir)]


def test_a_damaged_final_lora_is_refused_and_rewritten_on_resume(finished, tmp_path, capsys, corrupt_tensor):
    run = copy_of(finished.out_dir, tmp_path)
    lora = run / LORA_WEIGHT_NAME
    corrupt_tensor(lora, sorted(safetensors.torch.load_file(str(lora)))[0])  # a weight becomes huge
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    for command in (["sample", "--prompt", "x", "--out", str(tmp_path / "samples")],
                    ["evaluate", "--prompts", str(prompts), "--reward", "brightness", "--out", str(tmp_path / "eval")]):
        assert main([command[0], "--lora", str(run), "--seeds", "0-1", *command[1:]]) == 2
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlr-fast ")]
        assert len(ours) == 1 and f"{lora} is damaged: its weights do not match the checksum" in ours[0]
    finetune(resume=str(run))
    assert "Writing the run's final outputs again from" in capsys.readouterr().err
    assert lora.read_bytes() == (finished.out_dir / LORA_WEIGHT_NAME).read_bytes()


def test_a_complete_run_says_so_and_stops(finished, tmp_path, monkeypatch, capsys):
    run = copy_of(finished.out_dir, tmp_path)
    before = snapshot(run)

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete run loaded its models again")

    monkeypatch.setattr("rlr_fast.run_setup.load_models", no_loading)
    result = finetune(resume=str(run))
    assert f"{run} is complete: it trained all 4 steps" in capsys.readouterr().err
    assert snapshot(run) == before and result.metrics == finished.metrics and result.lora_path.is_file()


def test_checkpoints_and_the_lora_are_as_readable_as_every_other_output(finished):
    plain = (finished.out_dir / "config.yaml").stat().st_mode
    assert finished.checkpoint_path.stat().st_mode == plain and finished.lora_path.stat().st_mode == plain


def test_the_newest_checkpoints_are_kept(finished):
    assert sorted(p.name for p in (finished.out_dir / "checkpoints").iterdir()) == [
        "step_000002.safetensors", "step_000003.safetensors", "step_000004.safetensors"]  # keep_checkpoints=3


@pytest.mark.slow
def test_sigterm_while_the_final_lora_is_written_says_how_to_resume(tiny, tmp_path, monkeypatch, capsys):
    from rlr_fast import train

    def terminated(unet, out, step=None):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "save_lora", terminated)
    with pytest.raises(StopRequested):
        finetune(out_dir=str(tmp_path), train_steps=2, **tiny)
    err = capsys.readouterr().err
    assert (f"stopped by SIGTERM while writing the final outputs of step 2/2; checkpoint "
            f"{tmp_path / 'checkpoints' / 'step_000002.safetensors'} holds every step. Resume with: rlr-fast "
            f"finetune --resume {tmp_path}") in err
    monkeypatch.undo()
    finetune(resume=str(tmp_path))
    assert (tmp_path / LORA_WEIGHT_NAME).is_file()


def test_evaluate_and_sample_take_a_checkpoint(finished, tiny_folder, tmp_path, capsys):
    run = copy_of(finished.out_dir, tmp_path)
    checkpoint = run / "checkpoints" / "step_000002.safetensors"
    models = load_for_inference(str(tiny_folder), str(checkpoint), torch.device("cpu"), torch.float32)
    saved = read_checkpoint(checkpoint)
    unet_params = dict(models.unet.named_parameters())
    assert all(torch.equal(unet_params[name], saved.tensors[f"lora/{name}"]) for name in saved.meta["lora_names"])
    assert len(lora_parameters(models.unet)) == len(saved.meta["lora_names"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n")
    assert main(["evaluate", "--lora", str(checkpoint), "--prompts", str(prompts), "--seeds", "0-1",
                 "--reward", "brightness"]) == 0
    assert f"settings from the config of checkpoint {checkpoint}" in capsys.readouterr().err
    report = json.loads((run / "eval" / "step_000002" / "eval.json").read_text())
    assert report["settings"]["lora"] == str(checkpoint) and report["samples"] == 2
    assert main(["sample", "--lora", str(checkpoint), "--prompt", "x", "--seeds", "0",
                 "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()
