"""Data parallel fine-tuning on torch.distributed: one process per GPU, launched by torchrun.

    torchrun --nproc_per_node 4 -m rlr_fast finetune --preset sd14

`finetune` (from the CLI or from a script that torchrun launched) joins the process group that
torchrun describes in its environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), or uses one the script
already initialised: NCCL when the run is on GPUs (rank r on cuda:LOCAL_RANK), gloo on the CPU.
Without torchrun it runs as one process, exactly as before.

What the W ranks share and split, so that a run is the same run at any world size:
  - `batch_size` is the global micro-batch: each rank rolls out a contiguous 1/W of it.
  - Prompts and noise: the "sampling" generator advances identically on every rank; per
    micro-batch it draws the global batch's prompt ids and one seed, and global sample i's x_T and
    step noises come from a generator of its own seeded from (that seed, i). Sample i is the same
    whichever rank rolls it out. The "estimator" generator is identical too (the same j everywhere).
  - Rewards and prompt ids are all-gathered inside `estimate(..., group=ranks)`, so baselines,
    `normalize`'s scale and DDPO's advantages are those of the global micro-batch.
  - Gradients accumulate locally over the micro-batches, then ONE all-reduce of the flattened LoRA
    gradients (sum / W) per optimizer step, before clipping: every rank clips and steps AdamW on the
    same global-batch gradient, so the LoRA stays identical everywhere (and is broadcast from rank 0
    once at the start).
Why not DistributedDataParallel: an update calls the UNet dozens of times (rollout, reverse sweeps
that back-propagate into their inputs, likelihood-ratio chunks, micro-batches), often through a
CUDA graph. DDP reduces on every backward of a forward made through its wrapper; here it would
need the wrapper to be the module every one of those calls goes through (or the LoRA gradients
silently stay unsynchronised), `no_sync` around all but the last backward, and care with
checkpointed blocks; and what it buys, overlapping communication with the backward, is nothing
for a few MB of LoRA gradients. One explicit all-reduce is correct by construction, and
tests/test_distributed.py checks that the 2-rank gradient equals the 1-process one.

Rank 0 alone holds the out_dir's lock and writes config, metrics, sample grids, checkpoints and
the final LoRA, and shows the progress bar; every rank reads the checkpoint on resume (the out_dir
must be the same folder on every node: a shared file system). Every collective waits at most
`distributed_timeout` seconds; a rank that died or hangs makes the others raise `RankFailure`
(one line), and rank 0 writes a checkpoint of the last step all ranks completed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """Another rank died or stopped answering: a collective failed or timed out."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the W processes of a run, and the collectives the run uses.

    `Ranks()` is a run of one process: every collective is the identity."""

    world: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # what collectives move tensors to

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of `n` samples."""
        if n % self.world:
            raise ValueError(f"batch_size={n} does not split over {self.world} ranks: each rank rolls out "
                             f"batch_size / world_size samples; choose a batch_size divisible by {self.world}")
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def _collective(self, what: str, call: Callable):
        try:
            return call()
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise RankFailure(f"rank {self.rank} of {self.world}: {what} failed: another rank died or stopped "
                              f"answering (its own error says why) [{type(e).__name__}: {first}]") from e

    def gather(self, local: torch.Tensor, what: str = "gathering the batch's rewards") -> torch.Tensor:
        """Every rank's `local` (the same shape on each) concatenated along dim 0 in rank order."""
        if self.world == 1:
            return local
        moved = local.detach().to(self.device).contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.world)]
        self._collective(what, lambda: dist.all_gather(parts, moved))
        return torch.cat(parts).to(local.device)

    def mine(self, everyone: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a `gather`ed tensor."""
        return everyone[self.share(everyone.shape[0])]

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace every parameter's .grad with its mean over the ranks: one all-reduce of all of them
        flattened, followed by a flag per parameter. A .grad missing on some ranks counts as zero
        there; one missing on every rank stays missing (AdamW skips it, as in a 1-process run)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [present]).to(self.device)
        self._collective("averaging the gradients", lambda: dist.all_reduce(flat))
        values, present = flat[:-len(params)] / self.world, flat[-len(params):]
        for p, value, anywhere in zip(params, values.split([p.numel() for p in params]), present.tolist()):
            p.grad = value.view_as(p).to(p.device, p.dtype) if anywhere else None

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's values of `params` on every rank."""
        if self.world == 1:
            return
        flat = torch.cat([p.detach().reshape(-1) for p in params]).to(self.device)
        self._collective("sharing rank 0's LoRA", lambda: dist.broadcast(flat, src=0))
        with torch.no_grad():
            for p, value in zip(params, flat.split([p.numel() for p in params])):
                p.copy_(value.view_as(p))

    def first_on_main(self, call: Callable, what: str):
        """Run `call` on rank 0 alone; an exception it raises is raised on every rank (so a refusal
        there, such as an out_dir in use, stops all ranks with the same message)."""
        error = None
        if self.main:
            try:
                call()
            except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
                error = e
        if self.world > 1:
            box = [error]
            self._collective(what, lambda: dist.broadcast_object_list(box, src=0, device=self.device))
            error = box[0]
        if error is not None:
            raise error

    def agree(self, value: str, what: str,
              hint: str = "every node must see the same files (the out_dir on a shared file system)") -> None:
        """Stop with a ValueError (ending in `hint`) when the ranks hold different `value`s of `what`."""
        if self.world == 1:
            return
        values = [None] * self.world
        self._collective(f"comparing {what}", lambda: dist.all_gather_object(values, value))
        if len(set(values)) > 1:
            detail = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"the ranks found different {what} ({detail}); {hint}")

    def barrier(self, what: str) -> None:
        if self.world > 1:
            self._collective(what, lambda: dist.barrier())


def sample_seeds(seed: int, indices: Sequence[int]) -> list[int]:
    """The seed of each global sample index of a micro-batch drawn with `seed`: a hash of both, so
    neighbouring samples' generators are unrelated."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8).digest(), "little") >> 1
            for i in indices]


def _torchrun_env() -> tuple[int, int, int]:
    """WORLD_SIZE, RANK and LOCAL_RANK from the environment (1, 0, 0 when not launched by torchrun)."""
    try:
        return tuple(int(os.environ.get(k, default)) for k, default in
                     (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them), got "
                         f"{[os.environ.get(k) for k in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')]}") from None


def _rank_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    """The GPU of this rank (cuda:LOCAL_RANK) on a GPU run; the CPU otherwise."""
    if device.type != "cuda" or world == 1:
        return device
    if device.index is not None and device.index != local_rank:
        raise ValueError(f"device={str(device)!r} names one GPU, but under torchrun each rank takes its own "
                         f"(this is local rank {local_rank}); set device=cuda")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} needs GPU {local_rank}, but {torch.cuda.device_count()} are "
                         "visible; start at most that many processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[tuple[Ranks, torch.device]]:
    """This process's `Ranks` and the device it runs on, for the duration of a run.

    Uses the process group a script initialised; else joins the one torchrun describes in the
    environment (NCCL for GPU runs, gloo on the CPU, collectives timing out after `timeout_s`) and
    leaves it at the end; else a run of one process."""
    if dist.is_available() and dist.is_initialized():
        world, rank, local_rank = dist.get_world_size(), dist.get_rank(), _torchrun_env()[2]
        created = False
    else:
        world, rank, local_rank = _torchrun_env()
        created = world > 1
    device = _rank_device(device, local_rank, world)
    if created:
        if not dist.is_available():
            raise ValueError(f"WORLD_SIZE={world} asks for {world} processes, but this torch was built without "
                             "torch.distributed")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise RankFailure(f"rank {rank} of {world} could not join the process group that torchrun's environment "
                              f"describes (MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                              f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {type(e).__name__}: {first}") from e
    nccl = world > 1 and "nccl" in str(dist.get_backend())
    if nccl and device.type != "cuda":
        raise ValueError(f"the process group uses NCCL, which needs GPUs, but this run's device is {device}; "
                         "run on GPUs or initialise the group with backend='gloo'")
    ranks = Ranks(world, rank, device if nccl else torch.device("cpu"))
    try:
        yield ranks, device
    finally:
        if created:
            dist.destroy_process_group()
