"""What the planner's checks against a real update share: a pathwise step's bytes saved for backward and the
stored chain's bytes, planned on the meta device against the same update run on real CPU tensors."""

import importlib
import math

import torch

import rlr_fast
from rlr_fast.lora import lora_parameters

planner = importlib.import_module("rlr_fast.plan")  # rlr_fast.plan is bound to the function


def assert_plan_matches_update(plan, models, traj, batch: int) -> None:
    """`plan`'s full_bp step (LoRA rank 2, guidance together, input gradient, no checkpointing) within 1% of the
    peak saved bytes of a real full_bp estimate on `traj`, and its trajectory bytes exactly the stored chain's."""
    for q in lora_parameters(models.unet):  # as after the first step: gradients are resident
        q.grad = torch.zeros_like(q)
    real = rlr_fast.estimate(models.unet, traj, lambda x0: -x0.pow(2).flatten(1).mean(1), method="full_bp",
                             track_memory=True)["peak_saved_bytes"]
    planned = planner.default_table().unet_phase(
        plan.run.ids["unet"], plan.run.components["unet"], batch, plan.run.unet_latent, autocast=False,
        attention="flash", lora_rank=2, cfg_mode="together", grad="input", checkpoint=False, saved=True)
    assert math.isclose(planned, real, rel_tol=0.01), (planned, real)
    stored = sum(t.nbytes for t in (traj.latents, traj.noises, traj.log_probs, traj.encoder_hidden_states,
                                    traj.negative_encoder_hidden_states, traj.x0))
    assert plan.breakdown["trajectory"] == stored  # x_T..x_0, noises, log p, both packed prompts, dR/dx0
