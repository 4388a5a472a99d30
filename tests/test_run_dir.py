"""The out_dir of a run: refused before anything is written, one run at a time (stale locks of dead
processes ignored), temporary files of killed writes removed, writes atomic."""

import os
import signal
import subprocess
import sys

import pytest

from rlr_fast.run_dir import LOCK_NAME, RunLock, atomic_write, check_out_dir, clear_leftovers, start_afresh


def finished_run(out):
    (out / "checkpoints").mkdir(parents=True)
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
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"x")  # checkpoints deleted to save space
    with pytest.raises(ValueError, match=r"holds a run \(pytorch_lora_weights.safetensors\)"):
        check_out_dir(tmp_path, resuming=False, overwrite=False)


def test_what_a_failed_start_left_is_reusable(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 0.1\n")
    (out / "metrics.jsonl").write_text("")
    check_out_dir(out, resuming=False, overwrite=False)
    start_afresh(out)
    assert not any(out.iterdir())


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


def test_leftovers_of_interrupted_writes_are_removed(tmp_path, capsys):
    out = tmp_path
    (out / "checkpoints").mkdir()
    leftovers = [out / "checkpoints" / "step_000004.safetensors.a1b2.tmp", out / ".summary.json.x9.tmp",
                 out / ".tmpk3j4", out / "samples" / ".step_000002.png.q.tmp"]
    kept = [out / "checkpoints" / "step_000002.safetensors", out / "metrics.jsonl", out / "notes.txt"]
    for path in leftovers[:2] + kept:
        path.write_text("x")
    (out / ".tmpk3j4").mkdir()
    (out / ".tmpk3j4" / LOCK_NAME).write_text("x")
    (out / "samples").mkdir()
    leftovers[3].write_text("x")
    assert sorted(clear_leftovers(out)) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    assert "removed 4 temporary file(s)" in capsys.readouterr().err


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
