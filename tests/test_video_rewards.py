"""Video rewards (rlr_fast.rewards.video): image rewards averaged over frames, temporal consistency,
callables, and the latent reward that decodes every frame with the image VAE."""

import pytest
import torch

import rlr_fast
from rlr_fast import video
from rlr_fast import lora
from rlr_fast.inference import initial_noise
from rlr_fast.rewards import FrameAverage, TemporalConsistency, get_reward, get_video_reward, video_latent_reward

FRAMES = 3

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def _video(seed=0, batch=2, frames=FRAMES, size=8):
    return torch.rand(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_frame_average_scores_each_frame_against_its_video_prompt():
    v = _video()
    image = get_reward("color_match")
    want = torch.stack([torch.stack([image(v[b, f:f + 1], PROMPTS[b:b + 1])[0] for f in range(FRAMES)]).mean()
                        for b in range(2)])
    torch.testing.assert_close(get_video_reward("color_match")(v, PROMPTS), want)
    torch.testing.assert_close(get_video_reward(image)(v, PROMPTS), want)


def test_frame_chunks_give_the_same_values_and_gradients():
    grads = []
    for chunk in (None, 2):
        v = _video().requires_grad_()
        r = get_video_reward("color_match", frame_chunk=chunk)(v, PROMPTS)
        r.sum().backward()
        grads.append((r.detach(), v.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_temporal_consistency_measures_change_and_unevenness():
    still = torch.full((1, 4, 3, 2, 2), 0.5, dtype=torch.float64)
    fade = torch.linspace(0.2, 0.8, 4, dtype=torch.float64).reshape(1, 4, 1, 1, 1).expand(1, 4, 3, 2, 2)
    flicker = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 4, 1, 1, 1).expand(1, 4, 3, 2, 2)
    first, second = TemporalConsistency(order=1), TemporalConsistency(order=2)
    assert first(still, ["x"]).item() == 0 and second(still, ["x"]).item() == 0
    assert first(fade, ["x"]).item() == pytest.approx(-0.2 ** 2)  # frames 0.2 apart
    assert second(fade, ["x"]).item() == pytest.approx(0, abs=1e-15)  # a constant-rate change is even
    assert first(flicker, ["x"]).item() == pytest.approx(-1.0) and second(flicker, ["x"]).item() == pytest.approx(-1.0)
    v = _video(batch=1, frames=4, size=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: second(x, ["x"]), (v,))
    with pytest.raises(ValueError, match="order=2 needs at least 3 frames, got 2"):
        second(v[:, :2], ["x"])


def test_callable_video_reward_and_errors():
    v = _video()
    reward = get_video_reward(lambda video, prompts: video[:, -1].mean((1, 2, 3)) - video[:, 0].mean((1, 2, 3)))
    torch.testing.assert_close(reward(v, PROMPTS), v[:, -1].mean((1, 2, 3)) - v[:, 0].mean((1, 2, 3)))
    flat = get_video_reward(lambda video, prompts: video.detach().mean((1, 2, 3, 4)))
    flat(v.clone().requires_grad_(), PROMPTS)
    assert not flat.differentiable
    with pytest.raises(ValueError,
                       match=r"\(B, F, 3, H, W\), got \(2, 3, 4, 8, 8\); diffusers' .*video.transpose\(1, 2\)"):
        reward(_video(frames=4).transpose(1, 2), PROMPTS)
    with pytest.raises(ValueError, match="unknown reward 'temporal'; did you mean 'temporal_consistency'"):
        get_video_reward("temporal")
    with pytest.raises(TypeError, match="FrameAverage takes an image reward"):
        FrameAverage(TemporalConsistency())
    with pytest.raises(TypeError, match="frame_chunk is an option of frame-averaged image rewards"):
        get_video_reward("temporal_consistency", frame_chunk=2)
    with pytest.raises(TypeError, match="reward 'temporal_consistency' takes the options"):
        get_video_reward("temporal_consistency", order=1, blur=3)


def test_video_latent_reward_decodes_each_frame():
    """Frame f of sample b is latents[b, :, f]; decoded in chunks, checkpointed or not, the same."""
    parts = video.tiny_video("modelscope")
    x0 = torch.randn(2, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    reward = lambda v, prompts: seen.append(v.detach()) or v.mean((1, 2, 3, 4))
    out = {}
    for chunk, ckpt in ((1, True), (6, False)):
        x = x0.clone().requires_grad_()
        r = video_latent_reward(parts.vae, reward, PROMPTS, decode_chunk=chunk, checkpoint_vae=ckpt)(x)
        r.sum().backward()
        out[chunk] = (r.detach(), x.grad)
    torch.testing.assert_close(out[1], out[6])
    with torch.no_grad():
        frame = parts.vae.decode(x0[1, :, 2:3].transpose(0, 1) / parts.vae.config.scaling_factor).sample
    torch.testing.assert_close(seen[0][1, 2], (frame[0] / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"x0_latents must be a \(B, C, F, h, w\) tensor, got \(2, 4, 8, 8\)"):
        video_latent_reward(parts.vae, "brightness", PROMPTS)(x0[:, :, 0])


@pytest.mark.parametrize("kind", ("modelscope", "animatediff"))
@pytest.mark.slow
def test_estimate_through_the_vae_on_a_video_model(kind):
    parts = video.tiny_video(kind)
    lora.add_lora(parts.unet, rank=2, alpha=2, seed=0)
    cond = parts.encode_prompts(PROMPTS)
    x_T = initial_noise(parts.unet, 2, torch.Generator().manual_seed(0), torch.device("cpu"), num_frames=FRAMES)
    traj = rlr_fast.rollout(parts.unet, parts.scheduler, x_T, num_steps=4, eta=1.0, encoder_hidden_states=cond,
                            generator=torch.Generator().manual_seed(1))
    reward = video_latent_reward(parts.vae, get_video_reward("color_match"), PROMPTS)
    stats = rlr_fast.estimate(parts.unet, traj, reward, h=2, track_memory=True)
    assert len(stats["rewards"]) == 2 and stats["unet_backward"] > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.lora_parameters(parts.unet))
