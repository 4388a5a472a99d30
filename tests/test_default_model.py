"""The procedural demo data and the embedded default model trained on it.

The prompt-following test samples the shipped model with DDIM (`rlr_fast.rollout`) and reads the
colours back with `demo_data.measure_colors`. `PROMPTS` names every colour equally often (twice
as the shape, twice as the background), so an image that ignored its prompt would hit with
probability exactly 1/8 whatever colours it drew: that is the chance level of the binomial test.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rlr_fast import demo_data
from rlr_fast.default_model import default_model_path, load_default, sample

CHANCE = 1 / len(demo_data.COLORS)
TEST_SEEDS = (1000, 1001)  # not among the seeds the training script reports accuracy on


def _threshold(n: int) -> float:
    """Chance plus 3 binomial standard errors: a model that ignores its prompts passes with p < 0.2%."""
    return CHANCE + 3 * math.sqrt(CHANCE * (1 - CHANCE) / n)


def _accuracy(images: np.ndarray, prompts: list[str], part: str) -> float:
    hits = [demo_data.measure_colors(image)[part] == demo_data.parse_prompt(prompt)[part]
            for image, prompt in zip(images, prompts)]
    return float(np.mean(hits))


# --- demo data ----------------------------------------------------------------------------------

def test_palette_and_prompt_set():
    assert 6 <= len(demo_data.COLORS) <= 8
    assert len(set(demo_data.COLORS.values())) == len(demo_data.COLORS)
    assert demo_data.SHAPES == ("circle", "square", "triangle")
    parsed = [demo_data.parse_prompt(p) for p in demo_data.PROMPTS]
    for part in ("color", "background"):
        counts = {name: sum(p[part] == name for p in parsed) for name in demo_data.COLORS}
        assert len(set(counts.values())) == 1, f"{part} colours are not balanced in PROMPTS: {counts}"


def test_parse_prompt_round_trips_captions_and_tolerates_case():
    _, captions = demo_data.make_dataset(200, size=16, seed=3)
    for text in captions + demo_data.PROMPTS:
        assert demo_data.caption(**demo_data.parse_prompt(text)) == text
    assert demo_data.parse_prompt("A RED Circle") == {"color": "red", "shape": "circle", "background": None}
    assert demo_data.parse_prompt("a blue background with a white square") == {
        "color": "white", "shape": "square", "background": "blue"}
    assert demo_data.parse_prompt("a photo of a cat") == {"color": None, "shape": None, "background": None}


def test_make_example_is_deterministic_per_seed():
    first = demo_data.make_example(np.random.default_rng(7))
    again = demo_data.make_example(np.random.default_rng(7))
    other = demo_data.make_example(np.random.default_rng(8))
    assert first[0].shape == (32, 32, 3) and first[0].dtype == np.uint8
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    assert not np.array_equal(first[0], other[0])
    images, captions = demo_data.make_dataset(5, size=32, seed=7)
    assert np.array_equal(images[0], first[0]) and captions[0] == first[1]


@pytest.mark.parametrize("shape", demo_data.SHAPES)
def test_shape_colour_is_where_the_shape_is(shape):
    image = demo_data.draw("red", shape, "blue", size=32, cx=20.0, cy=12.0, r=6.0)
    assert tuple(image[12, 20]) == demo_data.COLORS["red"]  # the centre
    assert tuple(image[12, 8]) == demo_data.COLORS["blue"]  # left of the shape
    for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
        assert tuple(corner) == demo_data.COLORS["blue"]


def test_measure_colors_reads_the_caption_of_every_drawn_image():
    images, captions = demo_data.make_dataset(300, size=32, seed=11)
    for image, text in zip(images, captions):
        wanted = demo_data.parse_prompt(text)
        assert demo_data.measure_colors(image) == {"color": wanted["color"], "background": wanted["background"]}
    flat = np.broadcast_to(np.array(demo_data.COLORS["green"], np.uint8), (32, 32, 3))
    assert demo_data.measure_colors(flat) == {"color": None, "background": "green"}


# --- the embedded default model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def default_models():
    torch.set_num_threads(1)  # the model is tiny; threads would only contend
    return load_default()


def test_shipped_weights_are_small():
    files = [f for f in default_model_path().rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20


def test_load_default_is_an_sd14_style_pipeline_offline(default_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = default_models
    assert isinstance(m.unet, UNet2DConditionModel) and isinstance(m.vae, AutoencoderKL)
    assert isinstance(m.text_encoder, CLIPTextModel) and isinstance(m.tokenizer, CLIPTokenizer)
    assert isinstance(m.scheduler, DDIMScheduler)
    config = m.scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (config.clip_sample, config.set_alpha_to_one, config.steps_offset) == (False, False, 1)
    assert config.prediction_type == "epsilon"
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size
    assert m.vae.config.scaling_factor != 0.18215  # set from the training latents, not SD's value
    assert not any(p.requires_grad for p in m.unet.parameters())
    assert load_default(dtype=torch.float64).unet.dtype == torch.float64


@pytest.mark.slow
def test_samples_follow_their_prompts(default_models):
    prompts = demo_data.PROMPTS
    images = np.concatenate([sample(default_models, prompts, seed=s, num_steps=20, eta=0.0, guidance_scale=4.0)
                             for s in TEST_SEEDS])
    assert images.shape == (len(prompts) * len(TEST_SEEDS), 32, 32, 3) and images.dtype == np.uint8
    n = len(images)
    for part in ("color", "background"):
        accuracy = _accuracy(images, prompts * len(TEST_SEEDS), part)
        assert accuracy > _threshold(n), f"{part} accuracy {accuracy:.3f} on {n} samples is not above chance"


@pytest.mark.slow
def test_without_the_prompt_the_measurement_is_at_chance(default_models):
    """Control: with guidance off and the empty prompt, images cannot depend on the prompt they are
    scored against, so the measurement must not find prompt-following there."""
    prompts = demo_data.PROMPTS
    blank = [""] * len(prompts)
    images = np.concatenate([sample(default_models, blank, seed=s, guidance_scale=1.0) for s in TEST_SEEDS])
    n = len(images)
    for part in ("color", "background"):
        assert _accuracy(images, prompts * len(TEST_SEEDS), part) < _threshold(n)
