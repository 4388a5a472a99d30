"""A run's output directory: checked before anything is written, locked for the run's life, marked as
ours, cleared of what killed writes leave behind, and written to atomically.

    check_out_dir(out, resuming=False, overwrite=False)   # refuses before a byte is written
    with RunLock(out):                                     # one run per out_dir; gone when the run is
        start_afresh(out)                                  # (a fresh run) our earlier outputs go; marks out
        clear_leftovers(out)
        atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))

Whose files: a run marks its out_dir at its start (MARKER). A folder without the mark that holds
anything is not ours: no run starts in it or resumes from it (the refusal lists what is there). In a
marked folder a run deletes or moves only what rlr_fast writes there (`OUTPUTS`), never a file of
the user's. An out_dir holding a checkpoint or a final LoRA is continued with `resume`, and its run is
deleted only with `overwrite=True` asked for on that command line (YAML files and presets cannot ask
for it; `rlr_fast.config.load_config` refuses them); what a start that failed before its first
checkpoint left is reused without asking.

A write that fails (a full disk, an I/O error) is a WriteError naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

LOCK_NAME = ".rlr_fast.lock"
# The mark of a folder a run made its own (JSON: when it was marked).
MARKER = ".rlr_fast_run"
# Everything rlr_fast writes into an out_dir, as globs (finetune's outputs; `evaluate`'s reports in
# eval/). Only these are ever deleted or moved aside, here and in superseded/ (see `supersede`).
OUTPUTS = ("config.yaml", "metrics.jsonl", "reward_curve.png", "summary.json", "memory_plan.md",
           "pytorch_lora_weights.safetensors", "eval.jsonl", "eval_curve.png", "samples/step_*.png",
           "samples/step_*.gif", "checkpoints/step_*.safetensors", "checkpoints/state_*.safetensors",
           "designs/step_*.md", "designs/step_*.png", "tensorboard/events.out.tfevents.*", "eval/eval.json",
           "eval/eval.md", "eval/eval_grid.png", "eval/step_*/eval.json", "eval/step_*/eval.md",
           "eval/step_*/eval_grid.png")
SUPERSEDED = "superseded"
# The outputs of one step (step_NNNNNN.* and state_NNNNNN.*), and those of a run's end.
_STEP_OUTPUTS = ("checkpoints/step_*.safetensors", "checkpoints/state_*.safetensors", "samples/step_*",
                 "designs/step_*")
FINAL_OUTPUTS = ("pytorch_lora_weights.safetensors", "summary.json", "reward_curve.png", "eval_curve.png")
# What `atomic_write` names its temporary files: .NAME.8 hex digits.tmp
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


class WriteError(RuntimeError):
    """A write into the out_dir failed (a full disk, an I/O error): `path`, the OSError `error`, and
    what it means for the run (`detail`)."""

    def __init__(self, path: Path, error: OSError, detail: str = ""):
        self.path, self.error = Path(path), error
        code = errno.errorcode.get(error.errno or 0)
        super().__init__(f"cannot write {path}: {error.strerror or error}" + (f" ({code})" if code else "")
                         + (f"; {detail}" if detail else ""))


@contextlib.contextmanager
def writing(path: Path):
    """An OSError of writing `path` as a WriteError naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error) from error


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a hidden temporary file beside `path`, then rename it to `path`: a crash
    leaves the old file or the new one, never half of one (and `clear_leftovers` removes the
    temporary file a kill leaves). The file gets the permissions of a plain write under the umask,
    whatever `write` did (safetensors writes 0600). A failed write is a WriteError."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        try:
            write(Path(tmp))
            if os.stat(tmp).st_mode & 0o777 != mode:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def is_marked(out: Path) -> bool:
    """Whether `out` is a folder a run made its own."""
    return (Path(out) / MARKER).is_file()


def mark(out: Path) -> None:
    if not is_marked(out):
        atomic_write(out / MARKER, lambda tmp: tmp.write_text(
            json.dumps({"rlr_fast_run": True, "marked": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"))


def _listing(paths: Iterable[Path], root: Path, most: int = 6) -> str:
    names = sorted(p.relative_to(root).as_posix() + ("/" if p.is_dir() else "") for p in paths)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def foreign_folder(out: Path) -> Optional[str]:
    """Why `out` is not a folder of ours (a one-line reason listing what it holds), or None when it is
    one: marked, empty, or not there yet."""
    if not out.is_dir() or is_marked(out):
        return None
    held = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if not held:
        return None
    hint = ""
    if any((out / "checkpoints").glob("step_*.safetensors")):
        hint = f" (if it is a run of an older rlr_fast, `touch {out / MARKER}` adopts it)"
    return f"{out} holds files rlr_fast did not write ({_listing(held, out)}){hint}"


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
    write permission, a folder of someone else's, or (starting afresh without overwrite) a run with
    checkpoints or a final LoRA."""
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
    foreign = foreign_folder(out)
    if foreign:
        raise ValueError(f"out_dir {foreign}; a run starts only in a new or empty folder or one of its own: choose "
                         "another out_dir")
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
    """Remove the temporary files that interrupted atomic writes left (.NAME.XXXXXXXX.tmp) in the
    folders a run writes; returns what was removed. Only for a marked out_dir this process holds the
    RunLock of."""
    folders = {out} | {(out / pattern).parent for pattern in OUTPUTS if "*" not in Path(pattern).parent.name}
    removed = [path for folder in sorted(folders) for path in folder.glob(".*.tmp")
               if _TEMPORARY.match(path.name) and path.is_file()]
    for path in removed:
        path.unlink()
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted write in {out}", file=sys.stderr)
    return removed


def our_files(out: Path) -> list[Path]:
    """The files rlr_fast wrote in `out` (OUTPUTS), the superseded branches' included."""
    roots = [out] + sorted((out / SUPERSEDED).glob("from_step_*"))
    return sorted({p for root in roots for pattern in OUTPUTS for p in root.glob(pattern) if p.is_file()})


def _remove_empty_folders(out: Path, files: list[Path]) -> None:
    """Remove the folders of `files` under `out` that are empty now, deepest first."""
    folders = {parent for f in files for parent in f.relative_to(out).parents if parent != Path(".")}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something of the user's is in it
            (out / folder).rmdir()


def start_afresh(out: Path) -> None:
    """Delete an earlier run's outputs from `out` (after `check_out_dir` allowed it) and nothing else;
    then mark `out` as a run's folder."""
    earlier = our_files(out)
    for path in earlier:
        path.unlink()
    _remove_empty_folders(out, earlier)
    if earlier:
        print(f"removed the earlier run's outputs from {out}: {_listing(earlier, out)}", file=sys.stderr)
    mark(out)


def step_of(path: Path) -> Optional[int]:
    """The step of a step's output (step_NNNNNN.*, state_NNNNNN.*), None for another name."""
    match = re.match(r"^(?:step|state)_(\d+)\.", path.name)
    return int(match.group(1)) if match else None


def supersede(out: Path, step: int, final_step: Optional[int]) -> Optional[Path]:
    """Move aside what a run holds of steps after `step` (a resume from an earlier checkpoint starts a
    branch there): later checkpoints, grids and designs, the final outputs when they are of a later
    step (`final_step`), and copies of metrics.jsonl and eval.jsonl as they were. Returns the folder
    they went to (superseded/from_step_NNNNNN[_k]), None when nothing is later."""
    later = [p for pattern in _STEP_OUTPUTS for p in out.glob(pattern) if (step_of(p) or 0) > step]
    if final_step is not None and final_step > step:
        later += [out / name for name in FINAL_OUTPUTS if (out / name).is_file()]
    if not later:
        return None
    folder = out / SUPERSEDED / f"from_step_{step:06d}"
    k = 1
    while folder.exists():
        k += 1
        folder = out / SUPERSEDED / f"from_step_{step:06d}_{k}"
    for name in ("metrics.jsonl", "eval.jsonl"):
        if (out / name).is_file():
            with writing(folder / name):
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy2(out / name, folder / name)
    for path in later:
        target = folder / path.relative_to(out)
        with writing(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    return folder
