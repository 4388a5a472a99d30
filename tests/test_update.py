"""One optimizer step: prompt draws, the rollout's CUDA-graph / eager choice and its fallback, and
gradients that change nothing but .grad until the update is applied."""

import pytest
import torch

from rlr_fast.config import Config
from rlr_fast.models import tiny_sd
from rlr_fast.lora import add_lora, lora_parameters
from rlr_fast.rewards import get_reward
from rlr_fast.rollout import rollout
from rlr_fast.distributed import Ranks
from rlr_fast.update import (OnPolicy, PromptBank, StepContext, TrainingRollout, apply, draw_micro_batch,
                             draw_prompt_ids)


@pytest.fixture(scope="module")
def models():
    return tiny_sd(0)


def test_prompt_ids_are_distinct_groups_of_images_per_prompt():
    ids = draw_prompt_ids(10, batch_size=6, images_per_prompt=2, generator=torch.Generator().manual_seed(0))
    groups = ids.reshape(3, 2)
    assert (groups[:, 0] == groups[:, 1]).all() and len(set(groups[:, 0].tolist())) == 3
    few = draw_prompt_ids(2, batch_size=8, images_per_prompt=2, generator=torch.Generator().manual_seed(0))
    assert few.shape == (8,) and set(few.tolist()) <= {0, 1}  # more groups than prompts: drawn with repeats


def test_a_float64_run_draws_the_float32_run_s_noises(models):
    precise = tiny_sd(0)
    precise.unet.to(torch.float64)
    cfg, cpu = Config(num_steps=3, batch_size=4, images_per_prompt=2), torch.device("cpu")
    ids, x_T, noises = draw_micro_batch(cfg, 4, models, torch.Generator().manual_seed(5), Ranks(), cpu)
    ids64, x_T64, noises64 = draw_micro_batch(cfg, 4, precise, torch.Generator().manual_seed(5), Ranks(), cpu)
    assert x_T.dtype == noises.dtype == torch.float32 and x_T64.dtype == noises64.dtype == torch.float64
    assert torch.equal(ids64, ids) and torch.equal(x_T64, x_T.double()) and torch.equal(noises64, noises.double())


@pytest.mark.parametrize("choice, device, kind, reason", [
    ("auto", "cpu", "eager", "device is cpu (CUDA graphs need a GPU)"),
    ("auto+value", "cuda", "eager",
     "baseline='value' needs each step's x0 estimate, which the CUDA-graph rollout does not store"),
    ("eager", "cuda", "eager", "rollout='eager' was asked for"),
    ("auto", "cuda", "cuda_graph", None),
    ("cuda_graph", "cpu", "cuda_graph", None),  # tried; see the fallback test
])
def test_rollout_choice(models, choice, device, kind, reason):
    cfg = Config(rollout="auto", baseline="value") if choice == "auto+value" else Config(rollout=choice)
    chosen = TrainingRollout(cfg, models, torch.device(device))
    assert (chosen.kind, chosen.reason) == (kind, reason)


def test_a_failing_cuda_graph_falls_back_to_the_same_eager_chain(models, capsys):
    """On the CPU a graph cannot capture: the rollout says why once, then runs eagerly with the
    noise it was given, so the chain is the eager one."""
    chosen = TrainingRollout(Config(rollout="cuda_graph"), models, torch.device("cpu"))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = models.encode_prompts(["a", "b"])
    kw = dict(num_steps=3, eta=1.0, encoder_hidden_states=cond)
    noises = [torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    got = [chosen(x_T, noise, **kw) for noise in noises]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rollout: eager from now on (CUDA graph failed: RuntimeError: "
                                               "CUDA-graph rollouts need latents on a CUDA device, got cpu")
    assert chosen.kind == "eager" and chosen.reason.startswith("CUDA graph failed: RuntimeError")
    for noise, traj in zip(noises, got):
        eager = rollout(models.unet, models.scheduler, x_T, noises=noise, **kw)
        assert torch.equal(traj.noises, noise) and torch.equal(traj.latents, eager.latents)
        assert torch.equal(traj.log_probs, eager.log_probs)


def test_a_graph_failing_mid_rollout_falls_back_with_its_first_line(models, capsys):
    """A graph that fails after starting (as a failed capture on a GPU does) rolls out the same noise eagerly."""
    chosen = TrainingRollout(Config(rollout="cuda_graph"), models, torch.device("cpu"))

    def capture_fails(x_T, *, noises, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    chosen.graphed = capture_fails
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noises = torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(num_steps=3, eta=1.0, encoder_hidden_states=models.encode_prompts(["a", "b"]))
    traj = chosen(x_T, noises, **kw)
    eager = rollout(models.unet, models.scheduler, x_T, noises=noises, **kw)
    assert torch.equal(traj.latents, eager.latents)
    assert capsys.readouterr().err == ("rollout: eager from now on (CUDA graph failed: RuntimeError: operation not "
                                       "permitted when stream is capturing)\n")


def test_gradients_change_nothing_until_applied(models):
    """A step stopped after `gradients` leaves weights and optimizer state as they were."""
    cfg = Config(num_steps=3, batch_size=2, images_per_prompt=2, lr=1e-2)
    unet = add_lora(tiny_sd(0).unet, seed=0)
    run = tiny_sd(0)
    run.unet = unet
    params = lora_parameters(unet)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    generators = {"sampling": torch.Generator().manual_seed(0), "estimator": torch.Generator().manual_seed(1)}
    grads = OnPolicy(StepContext(cfg, run, PromptBank(run, ["a red circle", "a blue square"], ""),
                                 get_reward("brightness"), TrainingRollout(cfg, run, torch.device("cpu")), params,
                                 generators, torch.device("cpu"), torch.float32)).gradients()
    assert grads.skipped is None and grads.grad_norm > 0 and len(grads.rewards) == 2
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and not optimizer.state
    record = apply(cfg, 0, grads, optimizer)
    assert record["step"] == 1 and record["lr"] == cfg.lr and record["skipped"] is False
    assert any(not torch.equal(a, p) for a, p in zip(before, params)) and all(p.grad is None for p in params)


def test_gradients_fit_the_value_baseline_on_a_copy_returned_for_the_commit(models):
    """The running value fit's statistics change only when the caller keeps the returned state."""
    from rlr_fast.baselines import ValueStatistics

    cfg = Config(num_steps=3, batch_size=2, images_per_prompt=2, method="zo", baseline="value", grad_accum=2)
    run = tiny_sd(0)
    run.unet = add_lora(run.unet, seed=0)
    method = OnPolicy(StepContext(cfg, run, PromptBank(run, ["a red circle", "a blue square"], ""),
                                  get_reward("brightness"), TrainingRollout(cfg, run, torch.device("cpu")),
                                  lora_parameters(run.unet),
                                  {"sampling": torch.Generator().manual_seed(0),
                                   "estimator": torch.Generator().manual_seed(1)},
                                  torch.device("cpu"), torch.float32))
    state = method.initial_state()
    assert isinstance(state, ValueStatistics)
    grads = method.gradients(state)
    assert state.state_dict() == {}
    zo_steps = len(grads.stats["C"])
    assert grads.state.moments.count.max() == 2 * 0.9 + 2  # two micro-batches of 2, the first decayed once
    assert grads.stats["reward_forward"] == 2 * (1 + zo_steps)  # summed over the micro-batches


def test_the_estimator_options_are_built_and_validated_once_per_config(models, monkeypatch):
    """Steps of micro-batches reuse one validated EstimatorOptions: no rebuild per micro-batch or estimate."""
    from rlr_fast.options import EstimatorOptions

    cfg = Config(num_steps=3, batch_size=2, images_per_prompt=2, grad_accum=3, lr=1e-2)
    run = tiny_sd(0)
    run.unet = add_lora(tiny_sd(0).unet, seed=0)
    generators = {"sampling": torch.Generator().manual_seed(0), "estimator": torch.Generator().manual_seed(1)}
    ctx = StepContext(cfg, run, PromptBank(run, ["a red circle", "a blue square"], ""), get_reward("brightness"),
                      TrainingRollout(cfg, run, torch.device("cpu")), lora_parameters(run.unet), generators,
                      torch.device("cpu"), torch.float32)
    validated = []
    original = EstimatorOptions.validate
    monkeypatch.setattr(EstimatorOptions, "validate", lambda self: validated.append(self) or original(self))
    method = OnPolicy(ctx)
    for _ in range(2):
        assert method.gradients().skipped is None
    assert len(validated) == 1  # 2 steps x 3 micro-batches, each with an estimate and a KL metric: one build
