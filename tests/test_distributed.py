"""Data parallel runs on CPU with gloo, 2 processes: the averaged gradient equals the 1-process
one, a torchrun run equals a 1-process run, a killed rank stops the other with a clear error and
leaves intact checkpoints that resume (bit-exactly at the same world size); and the pieces that
need no process group: world-size-invariant micro-batches, given rollout noises, refusals."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch

from rlr_fast.checkpoint import read_checkpoint
from rlr_fast.cli import main
from rlr_fast.config import Config
from rlr_fast.distributed import RankFailure, Ranks, _rank_device, process_group
from rlr_fast.models import tiny_sd
from rlr_fast.lora import add_lora, lora_parameters
from rlr_fast.rewards import get_reward
from rlr_fast.rollout import rollout
from rlr_fast.train import finetune
from rlr_fast.prompts import PromptBank
from rlr_fast.update import OnPolicy, StepContext, TrainingRollout, draw_micro_batch

PROMPTS = ["a red circle", "a blue square", "a green field", "a white cat"]
# One update each, gradients unclipped. Prompt groups of 4 straddle the two ranks' halves, so a
# baseline or scale computed on one rank's samples alone would differ from the 1-process one.
GRADIENT_CASES = {
    "rlr, loo_prompt, checkpointed UNet, 2 accumulated micro-batches":
        dict(method="rlr", baseline="loo_prompt", images_per_prompt=2, checkpoint_unet=True, grad_accum=2),
    "zo, loo_prompt across ranks, normalized": dict(method="zo", baseline="loo_prompt", images_per_prompt=4,
                                                     normalize=True),
    "ddpo, per-prompt advantages across ranks": dict(method="ddpo", images_per_prompt=4, clip_range=0.5),
    # 3 samples a rank: a slope fitted on one rank's other samples (2 pairs) would fall back to a mean
    "zo, value baseline, loo fit across ranks": dict(method="zo", baseline="value", value_fit="loo", batch_size=6),
    "rlr, value baseline, running fit over 2 micro-batches": dict(method="rlr", baseline="value",
                                                                  value_fit="running", grad_accum=2),
}
# The gradients are compared in float64. In float32 the 2-rank and 1-process runs differ by rounding
# alone: the CPU's matmul kernels sum in an order that depends on the number of rows (tiny_sd's time
# embedding on 4 samples vs 2 + 2: 2e-7 apart, its UNet output 8e-7; measured), and the estimators
# amplify it (loo_prompt with 2 images a prompt and the value baseline weigh small residuals R - b, DDPO
# a ratio of nearly equal likelihoods): measured 2-rank errors of 8e-7 to 7e-4 of the gradient's scale
# (float32, AMD EPYC), where the last CI's CPU had kept the cases without a value baseline below 1e-6.
# In float64 the same comparison is at most 6e-13 (value baseline, loo fit; 3e-14 without a value
# baseline; measured), the same amplification of float64's 2e-16. RTOL leaves a margin of 100+ for
# another CPU's kernels; the bugs this catches move the gradient by 0.3 to 0.9 of its scale in every
# case (measured: a rank's share left out of the all-reduce, a wrong averaging factor, rewards not
# gathered so that baselines, scales and advantages come from one rank's samples alone).
RTOL = 1e-10
# Whole runs (4 demo steps, AdamW with its default eps, gradients clipped) are compared in float64
# too (dtype="float64"). In float32 their LoRAs ended 6e-4 apart on this CPU (AMD EPYC), even with
# AdamW's eps raised to 1e-6 as these runs had it (measured): AdamW's first step (lr 3e-3 x warm-up
# 1/5) moves every component by about lr whatever its gradient's size, so a component whose gradient
# is below float32's rounding of the larger ones (a LoRA A matrix while B is still zero) steps by
# 6e-4 in whichever direction the rounding points. In float64 the LoRAs agree to 3e-14 and the
# rewards exactly (measured); LORA_ATOL leaves a margin of 300 for another CPU's kernels. Broken on
# purpose, the LoRAs end 3e-4 to 5e-4 apart (averaging by W + 1: a change of scale, which clipping
# and AdamW nearly undo) or 1e-2 apart (a rank's share left out of the all-reduce, the gathered
# rewards in the wrong rank order).
LORA_ATOL = 1e-11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, port: int) -> None:
    """The environment torchrun gives a worker of 2 on this machine."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1, so runs compare bit for bit


def _spawn(target, *args, timeout: float = 300) -> list:
    """Run target(rank, port, *args) in 2 fresh processes; their exit codes."""
    context = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=target, args=(rank, port, *args)) for rank in range(2)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in processes]


def _report(path, call) -> None:
    """call()'s result, or the exception it raised, torch.save'd to `path` (the test reads it)."""
    try:
        result = {"result": call()}
    except BaseException as e:  # noqa: BLE001 - handed to the test
        result = {"error": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
    torch.save(result, path)


def _read(path):
    outcome = torch.load(path, weights_only=False)
    assert "error" not in outcome, outcome.get("traceback")
    return outcome["result"]


# ----------------------------------------------------------------------------------------------
# The gradient of one update


@contextlib.contextmanager
def _float64():
    """Everything made inside in float64: tiny_sd's weights, the LoRA, the noise, hence the chain."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _one_update(cfg: Config, ranks: Ranks) -> dict:
    """The gradient of one update, in float64 (RTOL says why)."""
    with _float64():
        models = tiny_sd(0)
        add_lora(models.unet, seed=0)
        params = lora_parameters(models.unet)
        generators = {"sampling": torch.Generator().manual_seed(0), "estimator": torch.Generator().manual_seed(1)}
        cpu = torch.device("cpu")
        method = OnPolicy(StepContext(cfg, models, PromptBank(models, PROMPTS, ""), get_reward("brightness"),
                                      TrainingRollout(cfg, models, cpu), params, generators, cpu, torch.float64, ranks))
        grads = method.gradients(method.initial_state())
    return {"grads": [p.grad.clone() for p in params], "rewards": grads.rewards, "stats": grads.stats,
            "value_state": None if grads.state is None else grads.state.state_dict()}


def _case_config(case: dict) -> Config:
    return Config(**{"num_steps": 3, "batch_size": 4, "max_grad_norm": None, **case})


def _gradient_worker(rank: int, port: int, out) -> None:
    _as_rank(rank, port)
    with process_group(torch.device("cpu"), timeout_s=3.0) as (ranks, _):
        _report(out / f"grads{rank}.pt", lambda: {name: _one_update(_case_config(case), ranks)
                                                  for name, case in GRADIENT_CASES.items()})
        # a rank that stops answering: the other's next collective times out with one clear line
        if rank == 1:
            time.sleep(6)
        else:
            _report(out / "timeout.pt", lambda: ranks.barrier("a barrier nobody else reaches"))


@pytest.fixture(scope="module")
def two_rank_gradients(tmp_path_factory):
    out = tmp_path_factory.mktemp("grads")
    codes = _spawn(_gradient_worker, out)
    return out, codes


@pytest.mark.slow
@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_the_two_rank_gradient_is_the_one_process_gradient(two_rank_gradients, name):
    out, codes = two_rank_gradients
    assert codes == [0, 0]
    single = _one_update(_case_config(GRADIENT_CASES[name]), Ranks())
    for rank in range(2):
        got = _read(out / f"grads{rank}.pt")[name]
        assert got["rewards"] == pytest.approx(single["rewards"], rel=RTOL)  # the same global batch
        assert {g.dtype for g in got["grads"] + single["grads"]} == {torch.float64}
        scale = max(float(g.abs().max()) for g in single["grads"])
        assert scale > 0
        worst = max(float((a - b).abs().max()) for a, b in zip(got["grads"], single["grads"]))
        assert worst <= RTOL * scale, f"rank {rank}: max |2-rank - 1-process| = {worst:.3g} (scale {scale:.3g})"
        # the value baseline fits on the whole batch: the same fits, the same running state
        assert got["stats"].get("value_fallbacks") == single["stats"].get("value_fallbacks")
        if single["value_state"] is not None:
            assert got["value_state"].keys() == single["value_state"].keys() != set()
            for key, value in single["value_state"].items():
                torch.testing.assert_close(got["value_state"][key], value, rtol=RTOL, atol=0)


@pytest.mark.slow
def test_a_rank_that_stops_answering_times_out_with_one_line(two_rank_gradients):
    outcome = torch.load(two_rank_gradients[0] / "timeout.pt", weights_only=False)
    assert outcome.get("error") == "RankFailure", outcome
    assert outcome["message"].startswith("rank 0 of 2: a barrier nobody else reaches failed: another rank died or "
                                         "stopped answering") and "Timed out" in outcome["message"]
    assert "\n" not in outcome["message"]


# ----------------------------------------------------------------------------------------------
# Whole runs: torchrun vs one process, a killed rank, resume


def _run_overrides(model, out_dir) -> dict:
    """The demo preset on the tiny model, 4 steps, in float64 (LORA_ATOL says why)."""
    return dict(model=str(model), out_dir=str(out_dir), dtype="float64", num_steps=3, batch_size=4,
                images_per_prompt=2, train_steps=4, checkpoint_every=2, sample_every=0, sample_prompts=1,
                sample_seeds=(0,), tensorboard=False)


def _cli_sets(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={list(value) if isinstance(value, tuple) else value}"]
    return args


def _lora(run_dir) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(str(run_dir / "pytorch_lora_weights.safetensors"))


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_same_run(run_dir, reference) -> None:
    """Runs at different world sizes: the same rewards and LoRA, up to float64 rounding (LORA_ATOL)."""
    lora, expected = _lora(run_dir), _lora(reference)
    assert {t.dtype for t in [*lora.values(), *expected.values()]} == {torch.float64}
    rewards = [r["reward_mean"] for r in _records(run_dir)]
    expected_rewards = [r["reward_mean"] for r in _records(reference)]
    worst = _max_difference(lora, expected)
    assert worst <= LORA_ATOL, f"the LoRAs are {worst:.3g} apart"
    assert rewards == pytest.approx(expected_rewards, rel=RTOL, abs=0)


@pytest.fixture(scope="module")
def single(tiny_folder, tmp_path_factory):
    """4 steps in one process."""
    return finetune("demo", **_run_overrides(tiny_folder, tmp_path_factory.mktemp("single") / "run")).out_dir


@pytest.fixture(scope="module")
def pair(tiny_folder, tmp_path_factory):
    """The same run as `single`, from the CLI under torchrun with 2 CPU processes."""
    out = tmp_path_factory.mktemp("pair") / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rlr_fast", "finetune", "--preset", "demo", *_cli_sets(_run_overrides(tiny_folder, out))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_a_torchrun_run_equals_the_one_process_run(single, pair):
    out, done = pair
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]  # one line per step, from rank 0 alone
    _assert_same_run(out, single)
    assert json.loads(done.stdout)["out_dir"] == str(out)  # the result is printed once, by rank 0
    assert done.stderr.count("done: 4 steps") == 1
    assert done.stderr.count("finetune:   0%|") == 1  # the progress bar too: rank 0's alone


def _killed_worker(rank: int, port: int, model, out) -> None:
    _as_rank(rank, port)

    def die_at_3(step, record):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    _report(out.parent / f"killed{rank}.pt", lambda: finetune("demo", callback=die_at_3, **_run_overrides(model, out)))


def _resume_worker(rank: int, port: int, out) -> None:
    """A script that initialised its own process group: finetune uses it and leaves it initialised."""
    _as_rank(rank, port)
    torch.distributed.init_process_group("gloo")

    def resume():
        done = finetune(resume=str(out)).out_dir
        return done, torch.distributed.is_initialized()

    _report(out.parent / f"resumed{rank}.pt", resume)


@pytest.fixture(scope="module")
def killed(tiny_folder, tmp_path_factory):
    """A 2-rank run whose rank 1 is killed (SIGKILL) right after step 3."""
    out = tmp_path_factory.mktemp("killed") / "run"
    codes = _spawn(_killed_worker, tiny_folder, out)
    return out, codes


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_with_a_clear_error_and_intact_checkpoints(killed):
    out, codes = killed
    assert codes == [0, -signal.SIGKILL]
    outcome = torch.load(out.parent / "killed0.pt", weights_only=False)
    assert outcome["error"] == "RankFailure" and "\n" not in outcome["message"]
    assert outcome["message"].startswith("rank 0 of 2: gathering the batch's ")
    assert "another rank died or stopped answering" in outcome["message"]
    # rank 0 kept the last step both ranks completed, beside the periodic checkpoint
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000002.safetensors", "step_000003.safetensors"]
    assert [read_checkpoint(out / "checkpoints" / n).step for n in names] == [2, 3]
    assert read_checkpoint(out / "checkpoints" / names[-1]).meta["world_size"] == 2
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_resume_at_the_same_world_size_is_bit_exact(killed, pair, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(killed[0], out)
    assert _spawn(_resume_worker, out) == [0, 0]
    assert _read(tmp_path / "resumed1.pt") == (out, True)
    assert _max_difference(_lora(out), _lora(pair[0])) == 0
    assert [r["reward_mean"] for r in _records(out)] == [r["reward_mean"] for r in _records(pair[0])]


@pytest.mark.slow
def test_resume_at_another_world_size_continues_the_same_run(killed, single, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(killed[0], out)
    finetune(resume=str(out))
    assert "written by 2 ranks, continued by 1" in capsys.readouterr().err
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]
    _assert_same_run(out, single)


# ----------------------------------------------------------------------------------------------
# Without a process group


def test_a_micro_batch_is_the_same_at_any_world_size():
    cfg = Config(num_steps=3, batch_size=8, images_per_prompt=2)
    models = tiny_sd(0)

    def draw(ranks):
        generator = torch.Generator().manual_seed(5)
        batch = draw_micro_batch(cfg, len(PROMPTS), models, generator, ranks, torch.device("cpu"))
        return batch, generator.get_state()

    (ids, x_T, noises), state = draw(Ranks())
    assert noises.shape == (3, 8, 4, 8, 8) and len(set(ids.tolist())) == 4
    for world in (2, 4):
        shares = [draw(Ranks(world, rank)) for rank in range(world)]
        assert torch.equal(torch.cat([s[0][0] for s in shares]), ids)
        assert torch.equal(torch.cat([s[0][1] for s in shares]), x_T)
        assert torch.equal(torch.cat([s[0][2] for s in shares], dim=1), noises)
        assert all(torch.equal(s[1], state) for s in shares)  # the generator advances the same on every rank


def test_ranks_refuse_a_batch_they_cannot_split():
    with pytest.raises(ValueError, match=r"batch_size=6 does not split over 4 ranks.*divisible by 4"):
        Ranks(4, 1).share(6)
    assert Ranks(4, 3).share(8) == slice(6, 8)


def test_one_process_collectives_change_nothing():
    ranks, params = Ranks(), [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.full((3,), 2.0)
    ranks.average_gradients(params)
    values = torch.arange(4.0)
    assert torch.equal(ranks.gather(values), values) and torch.equal(ranks.mine(values), values)
    assert torch.equal(params[0].grad, torch.full((3,), 2.0))


def test_a_rollout_runs_the_noises_it_is_given():
    models = tiny_sd(0)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_steps=3, eta=1.0, encoder_hidden_states=models.encode_prompts(["a", "b"]))
    drawn = rollout(models.unet, models.scheduler, x_T, generator=torch.Generator().manual_seed(1), **kw)
    noises = torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    given = rollout(models.unet, models.scheduler, x_T, noises=noises, **kw)
    assert torch.equal(drawn.noises, noises) and torch.equal(given.latents, drawn.latents)
    with pytest.raises(ValueError, match=r"noises must be a tensor of shape \(3, 2, 4, 8, 8\).*got \(2, 2, 4, 8, 8\)"):
        rollout(models.unet, models.scheduler, x_T, noises=noises[:2], **kw)


def test_each_rank_takes_its_own_gpu():
    with pytest.raises(ValueError, match="device='cuda:1' names one GPU.*local rank 0.*set device=cuda"):
        _rank_device(torch.device("cuda:1"), 0, 2)
    with pytest.raises(ValueError, match=r"local rank 64 needs GPU 64, but \d+ are visible"):
        _rank_device(torch.device("cuda"), 64, 65)
    assert _rank_device(torch.device("cpu"), 1, 2) == torch.device("cpu")


def test_a_rank_failure_is_one_line_from_the_cli(monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise RankFailure("rank 0 of 2: averaging the gradients failed: another rank died or stopped answering")

    monkeypatch.setattr("rlr_fast.train.finetune", fails)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["finetune", "--preset", "demo"]) == 1
    assert capsys.readouterr().err == ("rlr-fast finetune: rank 0 of 2: averaging the gradients failed: another rank "
                                       "died or stopped answering\n")


def test_the_memory_plan_is_for_one_rank_s_share(tiny_folder):
    import dataclasses

    from rlr_fast.plan import plan
    from rlr_fast.run_setup import plan_memory

    cfg = Config.from_preset("demo", model=str(tiny_folder), num_steps=3, batch_size=4, method="zo",
                             max_memory_gb=1.0)
    planned, table = plan_memory(cfg, world=2)
    assert table == plan(dataclasses.replace(cfg, batch_size=2)).table() != plan(cfg).table()
    assert planned.batch_size == 4
