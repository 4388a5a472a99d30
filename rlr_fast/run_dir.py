"""A run's output directory: checked before anything is written, locked for the run's life, cleared
of what killed writes leave behind, and written to atomically.

    check_out_dir(out, resuming=False, overwrite=False)   # refuses before a byte is written
    with RunLock(out):                                     # one run per out_dir; gone when the run is
        clear_leftovers(out)
        atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))

The rule that protects finished work: an out_dir holding a checkpoint or a final LoRA is continued
with `resume`, and is deleted only with `overwrite=True` asked for on that command line (YAML files
and presets cannot ask for it; `rlr_fast.config.load_config` refuses them). An out_dir holding only
what a start that failed before its first checkpoint left is reused without asking.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import secrets
import sys
from pathlib import Path
from typing import Callable

# Everything a run writes into its out_dir (removed when a run starts afresh there).
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "samples", "checkpoints", "tensorboard", "reward_curve.png",
               "summary.json", "memory_plan.md", "designs", "pytorch_lora_weights.safetensors", "eval.jsonl",
               "eval_curve.png", "eval")
LOCK_NAME = ".rlr_fast.lock"
# Folders of a run where an interrupted atomic write can leave its temporary file.
_WRITTEN_FOLDERS = (".", "checkpoints", "samples", "designs")


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a hidden temporary file beside `path`, then rename it to `path`: a crash
    leaves the old file or the new one, never half of one (and `clear_leftovers` removes the
    temporary file a kill leaves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's permissions, as a plain write
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def kept_work(out: Path) -> list[str]:
    """What in `out` a fresh start would destroy: its checkpoints and its final LoRA."""
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*.safetensors"))
    kept = [f"checkpoints/{name}" for name in checkpoints[-1:]]
    if len(checkpoints) > 1:
        kept.append(f"{len(checkpoints) - 1} earlier checkpoint" + ("s" if len(checkpoints) > 2 else ""))
    if (out / "pytorch_lora_weights.safetensors").is_file():
        kept.append("pytorch_lora_weights.safetensors")
    return kept


def check_out_dir(out: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse an out_dir that cannot hold a run, before anything is written: a file, a place without
    write permission, or (starting afresh without overwrite) a run with checkpoints or a final LoRA."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is an existing file; choose a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"out_dir {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {out} is not writable (no write permission on {existing}); choose another "
                         "out_dir")
    kept = [] if resuming or overwrite or not out.is_dir() else kept_work(out)
    if kept:
        raise ValueError(f"out_dir {out} holds a run ({', '.join(kept)}); continue it with --resume {out} "
                         f"(Python: resume={str(out)!r}), delete it with --set overwrite=true, or choose another "
                         "out_dir")


@contextlib.contextmanager
def _creating(what: str, path: Path):
    """An OSError of creating `path` (no permission, read-only or full disk) as one line naming it."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
            raise
        raise ValueError(f"cannot {what} {path}: {error.strerror}; choose another out_dir") from error


class RunLock:
    """An exclusive lock on an out_dir for as long as a run uses it (`with RunLock(out):`).

    An flock on out/.rlr_fast.lock, which holds the owner's PID: the kernel releases it when its
    process dies however it dies, so a lock file left by a killed run (a stale lock) never blocks.
    A second run refuses with one line naming the PID that holds the directory. Creates out_dir if
    needed; on release removes the lock file, and the directory again if it created it and nothing
    was written into it (a start that failed leaves nothing behind).
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.created = False
        self.fd = None

    def __enter__(self) -> "RunLock":
        with _creating("create out_dir", self.out):
            self.created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
        while True:
            with _creating("lock out_dir", self.out):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(f"out_dir {self.out} is in use by another run (PID {holder}); wait for it to end, "
                                 "or choose another out_dir") from None
            # a run releasing the lock unlinks the file; if it did so after we opened it, retry on the new file
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # while still holding the lock; see the inode check above
        os.close(self.fd)
        self.fd = None
        if self.created and not any(self.out.iterdir()):
            self.out.rmdir()


def clear_leftovers(out: Path) -> list[Path]:
    """Remove the temporary files and folders that interrupted writes left (`*.tmp`, `.tmp*`);
    returns what was removed. Only for an out_dir this process holds the RunLock of."""
    removed = []
    for folder in _WRITTEN_FOLDERS:
        for path in (out / folder).glob("*"):
            if path.name.endswith(".tmp") or path.name.startswith(".tmp"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted write in {out}", file=sys.stderr)
    return removed


def start_afresh(out: Path) -> None:
    """Delete an earlier run's outputs from `out` (after `check_out_dir` allowed it)."""
    earlier = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if earlier:
        print(f"removed the earlier run's outputs from {out}: {', '.join(p.name for p in earlier)}", file=sys.stderr)
