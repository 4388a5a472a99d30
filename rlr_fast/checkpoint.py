"""Checkpoints of a run: written atomically, verified by checksums on load, resumed bit-exactly.

A checkpoint (out_dir/checkpoints/step_NNNNNN.safetensors) holds the LoRA weights, the AdamW state,
every RNG state the run reads, the step (which fixes the LR schedule), the run's counters, its
config, the number of ranks that ran it (rank 0 writes; the state is the same on every rank), the
run's metrics records so far (metrics.jsonl is rebuilt from them when it is damaged) and the state
its method keeps across steps (rlr_fast.update.MethodState: DDPO's stored epoch, the running value
fit's statistics): tensors as safetensors tensors, the rest as JSON in the safetensors header. A
state too large to copy into every checkpoint (`stored_once`: SQDF's replay buffer, 3.1 GiB at SD1.4
size) goes to its own file, checkpoints/state_NNNNNN.safetensors, kept only beside the newest
checkpoint: older checkpoints of such a run hold its LoRA but cannot be resumed.

Every tensor and the JSON carry a BLAKE2b checksum, verified before anything is restored, so a
flipped bit or random bytes are caught as "corrupt" instead of resuming silently or failing deep
inside torch; a run resumes from its newest checkpoint that verifies, saying which it skipped.
Only a checkpoint inside a run folder of ours (RUN/checkpoints/, RUN marked by rlr_fast.run_dir)
is resumed: the run continues in RUN. `prune_checkpoints` keeps the newest few.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import safetensors
import safetensors.torch
import torch

from .config import Config
from .run_dir import MARKER, atomic_write, foreign_folder, is_marked

CHECKPOINT_FORMAT = 2
# Config keys that may change when a run resumes: they affect speed, memory, logging or length,
# not the numbers of the updates (device, rollout and memory options may change floating-point rounding).
RESUMABLE_CHANGES = {
    "preset", "out_dir", "overwrite", "resume", "train_steps", "sample_every", "sample_prompts", "sample_seeds",
    "checkpoint_every", "keep_checkpoints", "max_nonfinite", "profile", "tensorboard", "device", "max_memory_gb",
    "max_batch",
    "checkpoint_unet", "checkpoint_vae", "decode_chunk", "split_cfg", "free_text_encoder", "rollout",
    "distributed_timeout", "eval_every", "eval_prompts", "eval_num_prompts", "eval_seeds", "eval_rewards",
    "eval_reward_kwargs",
}


@dataclass
class Checkpoint:
    """A verified checkpoint file: its JSON part and its tensors."""

    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def run(self) -> Path:
        """The run folder the checkpoint belongs to."""
        return self.path.parent.parent

    def records(self) -> Optional[list[dict]]:
        """The run's metrics records up to this checkpoint's step, or None (a checkpoint without them)."""
        if "records" not in self.tensors:
            return None
        return [json.loads(line) for line in bytes(self.tensors["records"].numpy()).decode().splitlines()]

    @property
    def state_file(self) -> Optional[Path]:
        """The file of a method state stored once (None: the state, if any, is in the checkpoint)."""
        reference = self.meta.get("method_state_file")
        return None if reference is None else self.path.with_name(reference["name"])

    def check_state_file(self) -> None:
        """A ValueError when the method state this checkpoint needs is not beside it (it is kept only
        with the newest checkpoint)."""
        if self.state_file is not None and not self.state_file.is_file():
            raise ValueError(f"{self.path} cannot be resumed: the method's state {self.state_file.name} (stored once, "
                             "beside the newest checkpoint) is gone; resume from the newest checkpoint")

    def method_state(self) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
        """The tensors and JSON of the method's state (StepMethod.load_state reads them), or None."""
        if self.meta.get("method_state") is None:
            return None
        if self.state_file is None:
            tensors = {k[len("method/"):]: v for k, v in self.tensors.items() if k.startswith("method/")}
            return tensors, self.meta["method_state"]
        self.check_state_file()
        _, tensors, checksums = _read_verified(self.state_file)
        if meta_checksum(checksums) != self.meta["method_state_file"]["checksum"]:
            raise ValueError(f"{self.state_file} is not the method state {self.path.name} was written with (it is of "
                             "another branch of the run); resume from the newest checkpoint")
        return tensors, self.meta["method_state"]


# ----------------------------------------------------------------------------------------------
# RNG states


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """Every RNG state the run reads: torch CPU and CUDA, numpy, python, and our generators."""
    state = {"torch_cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Checksums


def tensor_checksum(tensor: torch.Tensor) -> str:
    """BLAKE2b of a tensor's dtype, shape and bytes."""
    digest = hashlib.blake2b(f"{tensor.dtype}{tuple(tensor.shape)}".encode(), digest_size=16)
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def meta_checksum(meta: dict) -> str:
    """BLAKE2b of the JSON part (without its checksums), key order independent."""
    return hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------------------------
# Save, read, verify


def _write_verified(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Write `tensors` and `meta` with their checksums atomically; returns the checksums."""
    meta = json.loads(json.dumps(meta))  # as it reads back, so the checksum is of what a reader sees
    checksums = {"meta": meta_checksum(meta), "tensors": {k: tensor_checksum(v) for k, v in tensors.items()}}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(
        tensors, str(tmp), metadata={"rlr_fast": json.dumps({**meta, "checksums": checksums})}))
    return checksums


def _read_verified(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """The JSON, tensors and checksums of a file `_write_verified` wrote, every checksum verified; a
    ValueError naming what is wrong otherwise."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # not a safetensors file, or a damaged header
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if "rlr_fast" not in header:
        raise ValueError(f"{path} is not an rlr_fast checkpoint (no rlr_fast metadata)")
    try:
        meta = json.loads(header["rlr_fast"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt: its metadata is not JSON ({e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {meta.get('format')}, this rlr_fast reads {CHECKPOINT_FORMAT}")
    checksums = meta.pop("checksums", None) or {}
    if checksums.get("meta") != meta_checksum(meta):
        raise ValueError(f"{path} is corrupt: its metadata does not match its checksum")
    expected = checksums.get("tensors", {})
    bad = sorted(set(expected) ^ set(tensors)) + [k for k in tensors if k in expected and
                                                  tensor_checksum(tensors[k]) != expected[k]]
    if bad:
        raise ValueError(f"{path} is corrupt: tensor {bad[0]!r}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                         + " do not match the checksums written with it")
    return meta, tensors, checksums


def save_checkpoint(path: Path, *, step: int, cfg: Config, unet, optimizer: torch.optim.Optimizer,
                    rng: dict, counters: dict, method_state=None, world_size: int = 1,
                    records: Optional[list[dict]] = None) -> Path:
    """LoRA weights, AdamW state, every RNG state, the step, the counters, the config, the world size,
    the metrics records so far and the method's state (a MethodState, or None), atomically. A state
    `stored_once` is written first to checkpoints/state_NNNNNN.safetensors (`prune_checkpoints`
    deletes the earlier ones)."""
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    params = dict(unet.named_parameters())
    tensors = {f"lora/{n}": params[n].detach().cpu().contiguous() for n in names}
    opt = optimizer.state_dict()
    opt_scalars = {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars[f"{index}/{key}"] = value
    tensors["rng/torch_cpu"] = rng["torch_cpu"]
    for name, state in rng["generators"].items():
        tensors[f"rng/generator/{name}"] = state
    for i, state in enumerate(rng.get("cuda", [])):
        tensors[f"rng/cuda/{i}"] = state
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, gauss = rng["python"]
    if records is not None:
        text = "".join(json.dumps(r) + "\n" for r in records).encode()
        tensors["records"] = torch.from_numpy(np.frombuffer(text, dtype=np.uint8).copy())
    method_meta, state_file = None, None
    if method_state is not None:
        method_tensors, method_meta = method_state.to_checkpoint()
        method_tensors = {k: v.detach().cpu().contiguous() for k, v in method_tensors.items()}
        if getattr(method_state, "stored_once", False):
            state_path = Path(path).with_name(f"state_{step:06d}.safetensors")
            checksums = _write_verified(state_path, method_tensors, {"format": CHECKPOINT_FORMAT, "step": step})
            state_file = {"name": state_path.name, "checksum": meta_checksum(checksums)}
        else:
            tensors.update({f"method/{k}": v for k, v in method_tensors.items()})
    _write_verified(path, tensors, {
        "format": CHECKPOINT_FORMAT, "step": step, "config": cfg.to_dict(), "lora_names": names,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "rng": {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                "python": [version, list(python_state), gauss],
                "generators": sorted(rng["generators"]), "cuda_devices": len(rng.get("cuda", []))},
        "counters": counters, "method_state": method_meta, "method_state_file": state_file, "world_size": world_size,
    })
    return Path(path)


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path`, every checksum verified; a ValueError naming what is wrong otherwise."""
    meta, tensors, _ = _read_verified(path)
    return Checkpoint(path=Path(path), meta=meta, tensors=tensors)


def run_folder(resume: str | Path) -> Path:
    """The run folder `resume` (a run folder, or a checkpoint file in its checkpoints/) names."""
    path = Path(resume)
    return path.parent.parent if path.is_file() else path


def find_checkpoint(resume: str | Path) -> Checkpoint:
    """The checkpoint to resume: a checkpoint file, or the newest checkpoint of a run directory that
    verifies (each skipped one is named on stderr with what is wrong with it)."""
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={str(path)!r}: no such run directory or checkpoint file")
    if path.is_file():
        if path.parent.name != "checkpoints" or not is_marked(path.parent.parent):
            raise ValueError(f"resume={str(path)!r} is not a checkpoint in a run folder of rlr_fast (RUN/checkpoints/, "
                             f"RUN marked by its run with {MARKER}): a run continues only in its own folder")
        checkpoint = read_checkpoint(path)
        checkpoint.check_state_file()
        return checkpoint
    if foreign_folder(path):
        raise ValueError(f"resume={str(path)!r}: {foreign_folder(path)}, so it is not a run folder of rlr_fast")
    found = sorted((path / "checkpoints").glob("step_*.safetensors"), reverse=True)
    if not found:
        raise FileNotFoundError(f"resume={str(path)!r}: {path / 'checkpoints'} holds no step_*.safetensors checkpoint "
                                "(a run that stopped before its first checkpoint starts again without --resume)")
    problems = []
    for candidate in found:
        try:
            checkpoint = read_checkpoint(candidate)
            checkpoint.check_state_file()
        except ValueError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            print(f"skipping a damaged checkpoint: {problem}", file=sys.stderr)
        return checkpoint
    older = f"; the {len(found) - 1} older one(s) are unreadable too" if len(found) > 1 else ""
    raise ValueError(f"resume={str(path)!r}: no readable checkpoint: {problems[0]}{older}. Start afresh with "
                     "--set overwrite=true")


def check_compatible(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse to resume a checkpoint with a config whose updates would differ."""
    current = cfg.to_dict()
    differ = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differ[:6])
        raise ValueError(f"cannot resume {path}: it was written by a run with another config ({detail}). "
                         f"Only {', '.join(sorted(RESUMABLE_CHANGES - {'preset', 'resume'}))} may change on resume")


def restore_lora(checkpoint: Checkpoint, unet) -> None:
    """Copy the checkpoint's LoRA weights into the UNet's LoRA (`add_lora` with the run's rank and alpha)."""
    meta, path = checkpoint.meta, checkpoint.path
    params = dict(unet.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if trainable != meta["lora_names"]:
        raise ValueError(f"{path} holds LoRA weights for other layers than this model's LoRA "
                         f"({len(meta['lora_names'])} vs {len(trainable)} tensors)")
    with torch.no_grad():
        for n in trainable:
            params[n].copy_(checkpoint.tensors[f"lora/{n}"])


def restore_checkpoint(checkpoint: Checkpoint, unet, optimizer: torch.optim.Optimizer) -> dict:
    """Load LoRA and optimizer state in place; returns the RNG state for `restore_rng`."""
    meta, tensors = checkpoint.meta, checkpoint.tensors
    restore_lora(checkpoint, unet)
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer"]["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    numpy_kind, pos, has_gauss, cached = meta["rng"]["numpy"]
    version, python_state, gauss = meta["rng"]["python"]
    rng = {
        "torch_cpu": tensors["rng/torch_cpu"],
        "numpy": (numpy_kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "python": (version, tuple(python_state), gauss),
        "generators": {name: tensors[f"rng/generator/{name}"] for name in meta["rng"]["generators"]},
    }
    if meta["rng"]["cuda_devices"]:
        rng["cuda"] = [tensors[f"rng/cuda/{i}"] for i in range(meta["rng"]["cuda_devices"])]
    return rng


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints in `folder` (0: keep them all), and every method
    state file but the one of the newest checkpoint that verifies, which is never deleted; returns
    what was deleted."""
    found = sorted(Path(folder).glob("step_*.safetensors"), reverse=True)
    newest = None
    for candidate in found:
        try:
            newest = read_checkpoint(candidate)
            newest.method_state()  # its state file verified too
            break
        except ValueError:
            newest = None
    if newest is None:  # nothing verifies: delete nothing
        return []
    doomed = [p for p in (found[keep:] if keep else []) if p != newest.path]
    doomed += [p for p in Path(folder).glob("state_*.safetensors") if p != newest.state_file]
    for path in doomed:
        path.unlink()
    return doomed
