"""rewards.latent's memory measures: the decoder checkpointed block by block, and the decode kept
outside autocast. Both must leave the values and gradients of a plain decode unchanged."""

import contextlib
import importlib

import pytest
import torch

from rlr_fast import demo_data
from rlr_fast.models import tiny_sd
from rlr_fast.rewards import latent, latent_reward

P = importlib.import_module("rlr_fast.plan")


@pytest.fixture(scope="module")
def vae():
    return tiny_sd(0).vae


def plain(vae, reward, prompts, latents):
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return reward((images / 2 + 0.5).clamp(0, 1), prompts)


def value_and_grad(fn, latents, forward_context=contextlib.nullcontext):
    x = latents.clone().requires_grad_(True)
    with forward_context():
        values = fn(x)
    (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), grad


def test_block_checkpointed_decode_gives_the_plain_values_and_gradients_in_less_memory(vae, monkeypatch):
    prompts = demo_data.PROMPTS[:3]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reward_fn = latent_reward(vae, "color_match", prompts, decode_chunk=1, checkpoint_vae=True)
    expected = value_and_grad(lambda x: plain(vae, reward_fn.reward, prompts, x), latents)
    got = value_and_grad(reward_fn, latents)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-7)

    def peak():
        x = latents.clone().requires_grad_(True)
        return P.measure(lambda: torch.autograd.grad(reward_fn(x).sum(), x), existing=[x]).peak_bytes

    by_blocks = peak()
    monkeypatch.setattr(latent, "checkpoint_blocks", lambda decoder: contextlib.nullcontext())
    by_sample_only = peak()
    assert by_blocks < 0.8 * by_sample_only


def test_checkpoint_blocks_restores_the_decoder(vae):
    from diffusers.models.resnet import ResnetBlock2D

    block = next(m for m in vae.decoder.modules() if isinstance(m, ResnetBlock2D))
    hooked = block.forward  # a bound method; set on the instance it stands for a hook's wrapper
    block.forward = hooked
    with latent.checkpoint_blocks(vae.decoder):
        assert block.forward is not hooked
    assert block.forward is hooked
    del block.forward
    with latent.checkpoint_blocks(vae.decoder):
        pass
    assert "forward" not in block.__dict__


def test_decode_and_reward_run_outside_autocast(vae):
    """Called under CPU autocast (as the loop calls it under CUDA autocast) the latent reward still
    decodes and scores in the VAE's float32, in the forward and in the backward's recomputation:
    the same numbers as without autocast, where bfloat16 convolutions would differ by ~1e-2."""
    prompts = demo_data.PROMPTS[:2]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    reward_fn = latent_reward(vae, "color_match", prompts, decode_chunk=2, checkpoint_vae=True)
    expected = value_and_grad(reward_fn, latents)
    got = value_and_grad(reward_fn, latents, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-8)
