"""The out_dir of a run: refused before anything is written, ours only when marked (nothing of the
user's deleted), one run at a time (stale locks of dead processes ignored), temporary files of killed
writes removed, writes atomic (a failed one named in one line), later outputs moved aside on a branch."""

import errno
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from rlr_fast.run_dir import (LOCK_NAME, MARKER, RunLock, WriteError, atomic_write, check_out_dir, clear_leftovers,
                              mark, start_afresh, supersede)


def finished_run(out):
    out.mkdir(parents=True)
    mark(out)
    (out / "checkpoints").mkdir()
    for step in (2, 4):
        (out / "checkpoints" / f"step_{step:06d}.safetensors").write_bytes(b"x")
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (out / "metrics.jsonl").write_text("{}\n")
    return out


def test_a_run_with_checkpoints_is_refused_without_overwrite_or_resume(tmp_path):
    out = finished_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"holds a run \(checkpoints/step_000004.safetensors, 1 earlier checkpoint, "
                                         r"pytorch_lora_weights.safetensors\); continue it with --resume .*run.*"
                                         r"--set overwrite=true"):
        check_out_dir(out, resuming=False, overwrite=False)
    check_out_dir(out, resuming=True, overwrite=False)
    check_out_dir(out, resuming=False, overwrite=True)


def test_a_final_lora_alone_is_kept_too(tmp_path):
    mark(tmp_path)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"x")  # checkpoints deleted to save space
    with pytest.raises(ValueError, match=r"holds a run \(pytorch_lora_weights.safetensors\)"):
        check_out_dir(tmp_path, resuming=False, overwrite=False)


def test_what_a_failed_start_left_is_reusable(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    mark(out)
    (out / "config.yaml").write_text("lr: 0.1\n")
    (out / "metrics.jsonl").write_text("")
    check_out_dir(out, resuming=False, overwrite=False)
    start_afresh(out)
    assert [p.name for p in out.iterdir()] == [MARKER]


def user_files(out):
    """A folder of someone else's, with names like a run's outputs."""
    names = ["checkpoints/epoch=3-step=1200.ckpt", "eval/results.json", "samples/photo_of_my_cat.png", "notes.tmp",
             "config.yaml", "metrics.jsonl", ".hidden"]
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    return names


def test_a_folder_we_did_not_mark_is_refused_listing_what_it_holds(tmp_path):
    out = tmp_path / "mine"
    user_files(out)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=rf"out_dir {out} holds files rlr_fast did not write \(.hidden, "
                                             r"checkpoints/, config.yaml, eval/, metrics.jsonl, notes.tmp and 1 "
                                             r"more\); a run starts only in a new or empty folder or one of its own"):
            check_out_dir(out, resuming=False, overwrite=overwrite)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_NAME).write_text("1")  # a stale lock of ours alone
    check_out_dir(empty, resuming=False, overwrite=False)


def test_a_fresh_start_deletes_only_our_outputs(tmp_path):
    out = finished_run(tmp_path / "run")
    theirs = [name for name in user_files(out) if name not in ("config.yaml", "metrics.jsonl")]  # those are ours
    (out / "samples" / "step_000002.png").write_bytes(b"png")
    (out / "superseded" / "from_step_000001" / "checkpoints").mkdir(parents=True)
    (out / "superseded" / "from_step_000001" / "checkpoints" / "step_000003.safetensors").write_bytes(b"x")
    start_afresh(out)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == sorted(theirs + [MARKER])


def test_leftovers_of_interrupted_writes_are_removed(tmp_path, capsys):
    out = tmp_path
    (out / "checkpoints").mkdir()
    (out / "samples").mkdir()
    leftovers = [out / "checkpoints" / ".step_000004.safetensors.a1b2c3d4.tmp", out / ".summary.json.0f9e8d7c.tmp",
                 out / "samples" / ".step_000002.png.12345678.tmp"]
    kept = [out / "checkpoints" / "step_000002.safetensors", out / "metrics.jsonl", out / "notes.txt",
            out / "notes.tmp", out / ".results.tmp", out / "samples" / "cat.png.tmp"]
    for path in leftovers + kept:
        path.write_text("x")
    assert sorted(clear_leftovers(out)) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    assert "removed 3 temporary file(s)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "inside a file"])
def test_an_out_dir_that_cannot_be_a_directory(tmp_path, kind):
    (tmp_path / "taken").write_text("")
    out = tmp_path / "taken" if kind == "file" else tmp_path / "taken" / "run"
    with pytest.raises(ValueError, match="is an existing file|cannot be created: .*taken is a file"):
        check_out_dir(out, resuming=False, overwrite=False)


def test_an_unwritable_out_dir_is_one_clear_error(unwritable_dir):
    out = unwritable_dir / "rlr_fast_run"
    refused = rf"(out_dir {out} is not writable|cannot create out_dir {out}).*choose another"
    with pytest.raises(ValueError, match=refused):
        check_out_dir(out, resuming=False, overwrite=False)  # from the permission bits
        with RunLock(out):  # what the bits do not tell (root, read-only file systems): the first write
            pass


def test_one_run_at_a_time(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=rf"out_dir {out} is in use by another run \(PID {os.getpid()}\); wait"):
            RunLock(out).__enter__()
    assert not out.exists()  # created by the lock, nothing written: removed again
    out.mkdir()
    with RunLock(out):
        (out / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # the lock file goes, the run's files stay
    with RunLock(out):  # and the directory can be locked again
        pass


def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
    """A run killed with SIGKILL leaves its lock file (with its PID) behind; the next run takes it."""
    out = tmp_path / "run"
    out.mkdir()
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\n"
            "os.kill(os.getpid(), 9)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(out / LOCK_NAME)], capture_output=True, text=True,
                            timeout=60)
    assert killed.returncode == -signal.SIGKILL and killed.stdout == "locked\n"
    assert (out / LOCK_NAME).read_text().strip().isdigit()  # the stale lock file is there
    with RunLock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, fails)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    (tmp_path / "plain.txt").write_text("written in place")
    assert path.stat().st_mode == (tmp_path / "plain.txt").stat().st_mode  # readable as any file the user writes


def test_safetensors_files_get_the_permissions_of_any_other_output(tmp_path):
    """safetensors creates its file 0600; an output is as readable as every other file the user writes."""
    (tmp_path / "plain.txt").write_text("x")
    path = atomic_write(tmp_path / "weights.safetensors",
                        lambda tmp: safetensors.torch.save_file({"w": torch.ones(2)}, str(tmp)))
    assert path.stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_write_names_the_file_and_the_cause(tmp_path, code):
    def full(tmp):
        tmp.write_text("half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(WriteError) as failed:
        atomic_write(tmp_path / "samples" / "step_000002.png", full)
    assert str(failed.value) == (f"cannot write {tmp_path / 'samples' / 'step_000002.png'}: {os.strerror(code)} "
                                 f"({errno.errorcode[code]})")
    assert not any((tmp_path / "samples").iterdir())


def test_a_branch_moves_the_later_outputs_aside(tmp_path):
    out = finished_run(tmp_path / "run")  # checkpoints 2 and 4, a final LoRA of step 4
    for step in (0, 2, 4):
        (out / "samples").mkdir(exist_ok=True)
        (out / "samples" / f"step_{step:06d}.png").write_bytes(b"png")
    (out / "checkpoints" / "state_000004.safetensors").write_bytes(b"x")
    (out / "summary.json").write_text("{}")
    moved = supersede(out, 2, final_step=4)
    assert moved == out / "superseded" / "from_step_000002"
    assert sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*") if p.is_file()) == [
        "checkpoints/state_000004.safetensors", "checkpoints/step_000004.safetensors", "metrics.jsonl",
        "pytorch_lora_weights.safetensors", "samples/step_000004.png", "summary.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002.safetensors"]
    assert (out / "metrics.jsonl").is_file()  # copied: the resumed run keeps its records up to step 2
    assert supersede(out, 2, final_step=None) is None  # nothing later any more
    (out / "checkpoints" / "step_000003.safetensors").write_bytes(b"x")
    assert supersede(out, 2, final_step=None) == out / "superseded" / "from_step_000002_2"
