"""Rewards: registry and input checks, weight-free built-ins, local-weight loaders, latent wrapper.

Learned rewards are tested on randomly initialised TINY models of the real architectures, saved
in the layout each loader documents; expected scores come from the transformers models' own
forward passes and the head's raw tensors, not from the loader's code path.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import rlr_fast.rewards as rewards
from rlr_fast import demo_data
from rlr_fast.models import write_byte_tokenizer
from rlr_fast.rewards import available_rewards, get_reward, latent_reward, register_reward
from rlr_fast.rewards.clip_models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess
from rlr_fast.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD

PROMPT = "a red circle on a blue background"
IMAGE_SIZE = 32  # the tiny vision towers' input size, so scoring images of this size needs no resize


def rand_images(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images.requires_grad_(requires_grad)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]


# --------------------------------------------------------------------------- registry and checks


def test_registry_lists_builtins_and_suggests_closest_name():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "color_match", "brightness", "aesthetic",
            "pickscore", "hpsv2", "imagereward"} <= set(available_rewards())
    with pytest.raises(ValueError, match="did you mean 'color_match'"):
        get_reward("colour_match")
    with pytest.raises(ValueError, match="did you mean 'jpeg_compressibility'"):
        get_reward("jpeg_compresibility")
    assert get_reward("Color-Match").differentiable  # names are case- and dash-insensitive
    with pytest.raises(TypeError, match="int"):
        get_reward(3)
    with pytest.raises(TypeError, match=r"reward 'brightness' takes the options \(\), got \['scale'\]"):
        get_reward("brightness", scale=2)


def test_register_reward_adds_a_name(monkeypatch):
    monkeypatch.setattr(rewards.base, "_REGISTRY", dict(rewards.base._REGISTRY))

    @register_reward("channel_gap")
    class ChannelGap(rewards.Reward):
        def __init__(self, weight: float = 1.0):
            super().__init__()
            self.weight = weight

        def score(self, images, prompts):
            return self.weight * (images[:, 0] - images[:, 2]).mean(dim=(1, 2))

    assert "channel_gap" in available_rewards()
    images = rand_images()
    expected = 2.0 * (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
    torch.testing.assert_close(get_reward("channel_gap", weight=2.0)(images, [PROMPT] * 2), expected)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("channel_gap")(lambda: None)
    built = get_reward("channel_gap")
    assert get_reward(built) is built
    with pytest.raises(TypeError, match="already built"):
        get_reward(built, weight=3.0)


def test_callable_rewards_declare_or_detect_differentiability():
    images = rand_images(requires_grad=True)
    smooth = get_reward(lambda x, p: x.mean(dim=(1, 2, 3)))
    assert smooth.differentiable
    assert smooth(images, [PROMPT] * 2).requires_grad and smooth.differentiable

    values_only = get_reward(lambda x, p: x.detach().numpy().mean(axis=(1, 2, 3)))
    assert values_only.differentiable  # unknown until called with images that require grad
    out = values_only(images, [PROMPT] * 2)
    assert out.dtype == torch.float32 and not out.requires_grad and not values_only.differentiable
    torch.testing.assert_close(out, images.detach().mean(dim=(1, 2, 3)))

    declared = get_reward(lambda x, p: x.mean(dim=(1, 2, 3)), differentiable=False)
    assert not declared.differentiable and not declared(images, [PROMPT] * 2).requires_grad

    with pytest.raises(TypeError, match="images, prompts"):
        get_reward(lambda x: x.mean())
    with pytest.raises(TypeError, match="only the option 'differentiable'"):
        get_reward(lambda x, p: x, scale=2)


def test_inputs_and_outputs_are_checked_with_clear_errors():
    reward = get_reward("brightness")
    images = rand_images()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(3, 32, 32\)"):
        reward(images[0], [PROMPT])
    with pytest.raises(ValueError, match=r"got \(2, 4, 32, 32\)"):
        reward(torch.rand(2, 4, 32, 32), [PROMPT] * 2)
    with pytest.raises(TypeError, match="divide uint8 pixels by 255"):
        reward((images * 255).to(torch.uint8), [PROMPT] * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-1"):
        reward(images * 2 - 1, [PROMPT] * 2)
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        reward(images, [PROMPT] * 3)
    with pytest.raises(TypeError, match="single string"):
        reward(images, PROMPT)
    with pytest.raises(TypeError, match="must be a str, got int"):
        reward(images, [PROMPT, 7])
    with pytest.raises(TypeError, match="torch.Tensor"):
        reward(images.numpy(), [PROMPT] * 2)
    wrong_shape = get_reward(lambda x, p: x.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match=r"returned shape \(2, 3\) for 2 images"):
        wrong_shape(images, [PROMPT] * 2)


# --------------------------------------------------------------------------- weight-free rewards


def jpeg_kb_reference(pixels: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_are_ddpo_file_sizes_without_gradient():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    flat = np.full((32, 48, 3), 120, dtype=np.uint8)
    pixels = np.stack([noise, flat])
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    expected = torch.tensor([jpeg_kb_reference(noise), jpeg_kb_reference(flat)])

    incompressibility = get_reward("jpeg_incompressibility")
    compressibility = get_reward("jpeg_compressibility")
    sizes = incompressibility(images, ["", ""])
    torch.testing.assert_close(sizes, expected)
    torch.testing.assert_close(compressibility(images, ["", ""]), -expected)
    assert sizes[0] > 2 * sizes[1]  # noise is far less compressible than a flat image
    assert not (incompressibility.differentiable or compressibility.differentiable)
    assert not sizes.requires_grad and sizes.grad_fn is None


def test_brightness_is_the_pixel_mean_with_uniform_gradient():
    images = rand_images(requires_grad=True)
    values = get_reward("brightness")(images, ["", ""])
    torch.testing.assert_close(values, images.detach().reshape(2, -1).mean(dim=1))
    values.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / (3 * IMAGE_SIZE**2)))


def colour(name: str) -> torch.Tensor:
    return torch.tensor(demo_data.COLORS[name], dtype=torch.float32) / 255


def test_color_match_of_a_uniform_image_is_the_mean_squared_colour_error():
    grey = torch.tensor([0.3, 0.5, 0.7])
    images = grey[None, :, None, None].expand(3, 3, 16, 16).contiguous()
    prompts = [PROMPT, "a green square", "a triangle on a yellow background"]
    values = get_reward("color_match")(images, prompts)
    red, blue = (grey - colour("red")).square().mean(), (grey - colour("blue")).square().mean()
    expected = torch.stack([-(red + blue) / 2, -(grey - colour("green")).square().mean(),
                            -(grey - colour("yellow")).square().mean()])
    torch.testing.assert_close(values, expected)
    with pytest.raises(ValueError, match="naming a colour"):
        get_reward("color_match")(images[:1], ["a circle"])


def test_color_match_reads_the_centre_box_and_the_border_ring():
    size = 20  # centre box: rows/cols 8..11; border ring: 2 pixels wide
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    image[:, :, 8:12, 8:12] = colour("red")[:, None, None]
    ring = torch.ones(size, size, dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    image[0][:, ring] = colour("blue")[:, None]
    reward = get_reward("color_match")
    assert reward(image, [PROMPT]).item() == 0.0  # perfect on both regions, whatever lies between
    assert reward(image, ["a blue circle on a red background"]).item() < -0.1

    image = image.requires_grad_(True)
    reward(image, [PROMPT]).backward()
    assert torch.all(image.grad == 0)  # at the optimum

    grey = torch.full((1, 3, size, size), 0.5, requires_grad=True)
    reward(grey, [PROMPT]).backward()
    centre = torch.zeros(size, size, dtype=torch.bool)
    centre[8:12, 8:12] = True
    torch.testing.assert_close(grey.grad[0].ne(0).all(dim=0), centre | ring, rtol=0, atol=0)
    # each region's term is a mean over its pixels, and the two terms are averaged
    torch.testing.assert_close(grey.grad[0][:, centre], ((colour("red") - 0.5) / (3 * 16))[:, None].expand(3, 16))
    torch.autograd.gradcheck(lambda x: reward(x, [PROMPT, "a green circle"]),
                             torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True))


def test_color_match_prefers_the_true_caption_of_demo_images():
    rng = np.random.default_rng(0)
    reward = get_reward("color_match")
    for _ in range(6):
        pixels, caption = demo_data.make_example(rng, 32)
        parts = demo_data.parse_prompt(caption)
        swapped = demo_data.caption(parts["background"], parts["shape"], parts["color"])
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
        true_score, swapped_score = reward(image.expand(2, -1, -1, -1), [caption, swapped])
        assert true_score > swapped_score + 0.05, caption


# --------------------------------------------------------------------------- tiny local weights


def tiny_clip(folder: Path, seed: int) -> "transformers.CLIPModel":  # noqa: F821
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_byte_tokenizer(folder)
    special = dict(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    layers = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=vocab_size, max_position_embeddings=77, **layers, **special),
                        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **layers), projection_dim=24,
                        logit_scale_init_value=2.0)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    return model


def head_tensors(in_features: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = {0: (1024, in_features), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    tensors = {}
    for index, (out_dim, in_dim) in sizes.items():
        tensors[f"layers.{index}.weight"] = torch.randn(out_dim, in_dim, generator=generator) / in_dim**0.5
        tensors[f"layers.{index}.bias"] = torch.randn(out_dim, generator=generator) * 0.1
    return tensors


def head_reference(tensors: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    for index in (0, 2, 4, 6, 7):
        features = features @ tensors[f"layers.{index}.weight"].T + tensors[f"layers.{index}.bias"]
    return features.squeeze(-1)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, tiny_clip(folder, seed=0)


def check_image_gradient(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    images = images.clone().requires_grad_(True)
    values = reward(images, prompts)
    assert values.shape == (images.shape[0],) and torch.isfinite(values).all()
    values.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    return values.detach()


@pytest.mark.parametrize("head_format", ["safetensors", "pth"])
def test_aesthetic_matches_clip_embedding_through_the_head(clip_folder, tmp_path, head_format):
    folder, clip = clip_folder
    tensors = head_tensors(in_features=24, seed=1)
    head_path = tmp_path / f"head.{head_format}"
    save_file(tensors, head_path) if head_format == "safetensors" else torch.save(tensors, head_path)
    reward = get_reward("aesthetic", clip_path=folder, head_path=head_path)
    assert reward.differentiable and not any(p.requires_grad for p in reward.parameters())

    images = rand_images(batch=3)
    values = check_image_gradient(reward, images, [PROMPT] * 3)
    with torch.no_grad():
        embedding = clip.visual_projection(clip.vision_model(pixel_values=normalise(images)).pooler_output)
        expected = head_reference(tensors, embedding / embedding.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward(images, [PROMPT] * 3), values, rtol=0, atol=0)  # deterministic
    resized = reward(F.interpolate(images, scale_factor=2, mode="nearest"), [PROMPT] * 3)
    assert torch.isfinite(resized).all()  # other sizes are resampled to the tower's input size


def test_aesthetic_head_files_are_validated(clip_folder, tmp_path):
    folder, _ = clip_folder
    wrong_width = tmp_path / "wide.safetensors"
    save_file(head_tensors(in_features=768, seed=0), wrong_width)
    with pytest.raises(ValueError, match="takes 768-dim features but the model gives 24"):
        get_reward("aesthetic", clip_path=folder, head_path=wrong_width)

    pickled = tmp_path / "pickled.pth"
    torch.save({**head_tensors(24, 0), "extra": io.StringIO("not a tensor")}, pickled)
    with pytest.raises(ValueError, match=r"weights_only=True\): WeightsUnpickler error") as e:
        get_reward("aesthetic", clip_path=folder, head_path=pickled)
    assert "weights_only=False" not in str(e.value)  # torch's advice to run the pickle is not passed on


def test_missing_weights_say_what_to_get_where_and_how_to_pass_paths(clip_folder, tmp_path, monkeypatch):
    from rlr_fast.config import load_config, parse_set

    folder, _ = clip_folder
    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv("RLR_FAST_WEIGHTS", str(nowhere))
    cases = [  # reward, options, what the message says to get, the file it looked for, the option naming it
        ("aesthetic", {}, "Hugging Face repo openai/clip-vit-large-patch14", nowhere / "clip-vit-large-patch14",
         "clip_path"),
        ("aesthetic", {"clip_path": folder}, "sac+logos+ava1-l14-linearMSE.pth from "
         "github.com/christophschuhmann/improved-aesthetic-predictor", nowhere / "sac+logos+ava1-l14-linearMSE.pth",
         "head_path"),
        ("pickscore", {}, "Hugging Face repo yuvalkirstain/PickScore_v1", nowhere / "PickScore_v1", "path"),
        ("hpsv2", {}, "rlr-fast convert hpsv2 --checkpoint HPS_v2.1_compressed.pt --tokenizer "
         f"CLIP-ViT-H-14-laion2B-s32B-b79K --out {nowhere / 'HPSv2'}", nowhere / "HPSv2", "path"),
        ("imagereward", {}, "rlr-fast convert imagereward --checkpoint ImageReward.pt --tokenizer bert-base-uncased "
         f"--out {nowhere / 'ImageReward'}", nowhere / "ImageReward", "path"),
    ]
    for name, options, source, looked_for, option in cases:
        with pytest.raises(FileNotFoundError) as error:
            get_reward(name, **options)
        message = str(error.value)
        assert source in message and str(looked_for) in message, message
        assert f"get_reward({name!r}, " in message and f"{option}=<" in message  # the Python form
        cli = message[message.index("--set '") + len("--set '"):].split("'")[0]  # the command-line form
        key, value = parse_set(cli)
        assert key == "reward_kwargs" and option in value, cli
        # followed on the sd14 preset, the suggestion keeps the preset's fp16 reward network (issue 24 §2)
        assert load_config(preset="sd14", sets=[cli]).reward_kwargs["dtype"] == "float16", cli

    weights_only = tmp_path / "no_tokenizer"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="vocab.json \\+ merges.txt.*laion/CLIP-ViT-H-14"):
        get_reward("pickscore", path=weights_only)


def copy_clip_without(folder: Path, target: Path, dropped_prefix: str) -> Path:
    from safetensors.torch import load_file

    target.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (target / name).write_bytes((folder / name).read_bytes())
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith(dropped_prefix)}, target / "model.safetensors",
              metadata={"format": "pt"})
    return target


def test_partial_or_foreign_checkpoints_are_refused(clip_folder, tmp_path):
    folder, _ = clip_folder
    head_path = tmp_path / "head.safetensors"
    save_file(head_tensors(in_features=24, seed=1), head_path)
    image_only = copy_clip_without(folder, tmp_path / "image_only", "text_model.")
    assert get_reward("aesthetic", clip_path=image_only, head_path=head_path).differentiable  # needs no text tower
    with pytest.raises(ValueError, match="lacks .* weights it needs.*text_model"):
        get_reward("pickscore", path=image_only)
    text_only = copy_clip_without(folder, tmp_path / "text_only", "vision_model.")
    with pytest.raises(ValueError, match="lacks .* weights it needs.*vision_model"):
        get_reward("aesthetic", clip_path=text_only, head_path=head_path)
    config = json.loads((folder / "config.json").read_text())
    (text_only / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(ValueError, match="holds a 'siglip' model, expected a transformers CLIPModel"):
        get_reward("hpsv2", path=text_only)


def test_pickscore_and_hpsv2_are_scaled_clip_cosines(clip_folder):
    from transformers import CLIPTokenizer

    folder, clip = clip_folder
    prompts = [PROMPT, "a green triangle on a black background"]
    images = rand_images(batch=2, seed=3)
    pickscore = get_reward("pickscore", path=folder)
    hpsv2 = get_reward("hpsv2", path=folder)
    pick_values = check_image_gradient(pickscore, images, prompts)
    hps_values = check_image_gradient(hpsv2, images, prompts)

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokens = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        output = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                      pixel_values=normalise(images))
    cosine = F.cosine_similarity(output.image_embeds, output.text_embeds, dim=-1)
    torch.testing.assert_close(hps_values, cosine, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pick_values, torch.exp(torch.tensor(2.0)) * cosine, rtol=1e-4, atol=1e-5)
    # the prompt matters: the same images scored against swapped prompts change
    assert not torch.allclose(hpsv2(images, prompts[::-1]), hps_values)
    torch.testing.assert_close(hpsv2(images, prompts), hps_values, rtol=0, atol=0)


def tiny_blip(folder: Path) -> "transformers.BlipForImageTextRetrieval":  # noqa: F821
    """A tiny BlipForImageTextRetrieval folder as `rlr-fast convert imagereward` writes one, with its head."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    folder.mkdir(parents=True)
    words = sorted({w for p in demo_data.PROMPTS for w in p.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    layers = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=40, encoder_hidden_size=32, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, sep_token_id=3, **layers),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6, **layers), projection_dim=24)
    torch.manual_seed(0)
    blip = BlipForImageTextRetrieval(config).eval()
    blip.save_pretrained(folder)
    save_file(head_tensors(in_features=32, seed=3), folder / "head.safetensors")
    return blip


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip") / "ImageReward"
    return folder, tiny_blip(folder)


def test_imagereward_scores_the_cross_attending_cls_feature(blip_folder, tmp_path):
    from transformers import BertTokenizer

    folder, blip = blip_folder
    # the released ImageReward.pt as head file: one state dict with the head under mlp.* next to the BLIP tensors
    tensors = head_tensors(in_features=32, seed=2)
    checkpoint = {f"mlp.{k}": v for k, v in tensors.items()}
    checkpoint["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    torch.save(checkpoint, tmp_path / "ImageReward.pt")

    reward = get_reward("imagereward", path=folder, head_path=tmp_path / "ImageReward.pt")
    prompts = [PROMPT, "an orange triangle on a blue background", "a white circle"]
    images = rand_images(batch=3, seed=4)
    values = check_image_gradient(reward, images, prompts)

    tokens = BertTokenizer.from_pretrained(folder)(prompts, padding="max_length", max_length=35, truncation=True,
                                                   return_tensors="pt")
    with torch.no_grad():
        output = blip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                      pixel_values=normalise(images), use_itm_head=True)
    expected = (head_reference(tensors, output.question_embeds[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward(images, prompts), values, rtol=0, atol=0)
    default_head = get_reward("imagereward", path=folder)  # the converted folder's head.safetensors
    assert not torch.allclose(default_head(images, prompts), values)


# --------------------------------------------------------------------------- precision, checkpointing, preprocessing


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    save_file(head_tensors(in_features=24, seed=1), path)
    return path


@pytest.fixture
def build_reward(clip_folder, blip_folder, aesthetic_head):
    """name, options -> (the reward on the tiny weights, its vision tower)."""
    def build(name: str, **options):
        if name == "aesthetic":
            reward = get_reward(name, clip_path=options.pop("folder", clip_folder[0]), head_path=aesthetic_head,
                                **options)
            return reward, reward.vision
        if name == "imagereward":
            reward = get_reward(name, path=blip_folder[0], **options)
            return reward, reward.vision
        reward = get_reward(name, path=options.pop("folder", clip_folder[0]), **options)
        return reward, reward.model.vision_model
    return build


LEARNED = ["aesthetic", "pickscore", "hpsv2", "imagereward"]


def values_and_gradient(reward, images, prompts):
    images = images.clone().requires_grad_(True)
    values = reward(images, prompts)
    values.sum().backward()
    return values.detach(), images.grad


@pytest.mark.parametrize("name", LEARNED)
def test_reward_network_runs_in_the_chosen_precision(build_reward, name):
    reference, _ = build_reward(name)
    reward, tower = build_reward(name, dtype="bfloat16")
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    images, prompts = rand_images(batch=2, seed=5), [PROMPT, "a green square"]
    values, gradient = values_and_gradient(reward, images, prompts)
    expected, expected_gradient = values_and_gradient(reference, images, prompts)
    assert values.dtype == torch.float32 and gradient.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: agreement to a few percent of the scores, not to float32 rounding
    # (measured on these towers: 3% for hpsv2, 0.1% for imagereward; gradient cosines above 0.9998)
    assert (values - expected).abs().max() < 0.1 * expected.abs().max()
    assert F.cosine_similarity(gradient.flatten(), expected_gradient.flatten(), dim=0) > 0.99
    assert build_reward(name, dtype=torch.float16)[1].embeddings.patch_embedding.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="reward dtype must be one of .*'float8'"):
        build_reward(name, dtype="float8")


def saved_peak(run, module) -> int:
    """Peak bytes autograd keeps for backward while `run()` builds its graph and back-propagates, not
    counting the frozen weights of `module` (alive anyway)."""
    from rlr_fast.sweep import SavedTensorMemory

    memory = SavedTensorMemory(exclude=list(module.parameters()))
    with memory.track():
        run()
    return memory.peak


@pytest.mark.parametrize("name", LEARNED)
def test_vision_checkpointing_keeps_gradients_and_saves_fewer_bytes(build_reward, name):
    images, prompts = rand_images(batch=2, seed=6), [PROMPT, "a green square"]
    results, towers = {}, {}
    for checkpointed in (False, True):
        reward, towers[checkpointed] = build_reward(name, checkpoint_vision=checkpointed)
        outputs = []
        peak = saved_peak(lambda: outputs.extend(values_and_gradient(reward, images, prompts)), reward)
        results[checkpointed] = (*outputs, peak)
    (values, gradient, plain_peak), (checkpointed_values, checkpointed_gradient, checkpointed_peak) = results.values()
    torch.testing.assert_close(checkpointed_values, values, rtol=0, atol=0)
    torch.testing.assert_close(checkpointed_gradient, gradient, rtol=1e-6, atol=1e-9)
    assert gradient.abs().sum() > 0

    # What the plain vision tower alone keeps for backward. Checkpointing keeps each layer's input
    # only; with 2 layers the patch embedding's share stays, so half of it must go (more with depth).
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, requires_grad=True)
    tower = towers[False]
    tower_peak = saved_peak(lambda: tower(pixel_values=pixels).last_hidden_state.sum().backward(), tower)
    print(f"{name}: saved-tensor peak {plain_peak} B plain, {checkpointed_peak} B with checkpoint_vision "
          f"(plain vision tower alone: {tower_peak} B)")
    assert plain_peak - checkpointed_peak > 0.5 * tower_peak


def reference_photo(height: int = 96, width: int = 131) -> np.ndarray:
    """A deterministic uint8 image with smooth gradients, hard edges, fine stripes and noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([0.2 + 0.6 * x, 0.8 - 0.5 * y, 0.5 + 0.3 * np.sin(12 * x + 7 * y)], axis=-1)
    image[(y - 0.35) ** 2 + (x - 0.45) ** 2 < 0.05] = (0.9, 0.15, 0.1)
    image[:, (np.arange(width) // 3) % 4 == 0] *= 0.6
    image += rng.normal(0, 0.03, image.shape)
    return (image.clip(0, 1) * 255).round().astype(np.uint8)


def pixels_seen_by(tower, reward, pixels: np.ndarray) -> torch.Tensor:
    """The pixel_values the reward feeds its vision tower for one uint8 image."""
    seen = {}
    handle = tower.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        reward(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, [PROMPT])
    finally:
        handle.remove()
    return seen["pixel_values"][0].float()


def grey_levels(ours: torch.Tensor, reference: torch.Tensor, std) -> torch.Tensor:
    """|difference| of normalised pixels in 8-bit grey levels (1/255 of the [0, 1] range)."""
    return (ours - reference).abs() * torch.tensor(std)[:, None, None] * 255


# PIL resamples in uint8 with its own rounding, torch in float: on the reference photo the two differ
# by at most 0.9 grey levels, 0.28 on average (measured); a crop one pixel off differs by ~24 on average.
MAX_LEVELS, MEAN_LEVELS = 1.5, 0.35


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2"])
def test_clip_rewards_preprocess_as_clip_image_processor(build_reward, clip_folder, tmp_path, name):
    from transformers import CLIPImageProcessor

    folder = tmp_path / "clip"
    folder.mkdir()
    for file in clip_folder[0].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    mean, std = (0.5, 0.45, 0.4), (0.22, 0.25, 0.28)  # not CLIP's: the folder's own statistics must be read
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                       image_mean=mean, image_std=std).save_pretrained(folder)
    reward, tower = build_reward(name, folder=folder)
    photo = reference_photo()  # 96 x 131 -> 32 x int(43.67) = 43: an odd excess of 11 columns to crop
    reference = CLIPImageProcessor.from_pretrained(folder)(images=Image.fromarray(photo),
                                                           return_tensors="pt").pixel_values[0]
    levels = grey_levels(pixels_seen_by(tower, reward, photo), reference, std)
    assert levels.max() < MAX_LEVELS and levels.mean() < MEAN_LEVELS, (levels.max(), levels.mean())


def imagereward_transform(pixels: np.ndarray, size: int) -> torch.Tensor:
    """ImageReward's eval transform: torchvision Resize(size, BICUBIC) (shorter side to size, longer
    int(size * long / short)), CenterCrop(size) (offset int(round(excess / 2))), ToTensor, CLIP Normalize."""
    height, width = pixels.shape[:2]
    long = int(size * max(height, width) / min(height, width))
    resized_w, resized_h = (size, long) if width <= height else (long, size)
    resized = np.asarray(Image.fromarray(pixels).resize((resized_w, resized_h), Image.BICUBIC))
    top, left = int(round((resized_h - size) / 2.0)), int(round((resized_w - size) / 2.0))
    cropped = resized[top:top + size, left:left + size]
    return normalise(torch.from_numpy(cropped.copy()).permute(2, 0, 1).float() / 255)


def test_imagereward_preprocesses_as_its_own_transform(build_reward):
    reward, tower = build_reward("imagereward")
    photo = reference_photo()
    ours = pixels_seen_by(tower, reward, photo)
    levels = grey_levels(ours, imagereward_transform(photo, IMAGE_SIZE), OPENAI_CLIP_STD)
    assert levels.max() < MAX_LEVELS and levels.mean() < MEAN_LEVELS, (levels.max(), levels.mean())
    # the crop offset convention matters on this image: CLIPImageProcessor's floor is a column off
    floor_crop = preprocess(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255, IMAGE_SIZE,
                            OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[0]
    assert grey_levels(floor_crop, ours, OPENAI_CLIP_STD).mean() > 5 * MEAN_LEVELS
    portrait = photo.transpose(1, 0, 2).copy()  # the excess to crop is in the rows
    levels = grey_levels(pixels_seen_by(tower, reward, portrait), imagereward_transform(portrait, IMAGE_SIZE),
                         OPENAI_CLIP_STD)
    assert levels.max() < MAX_LEVELS and levels.mean() < MEAN_LEVELS, (levels.max(), levels.mean())


def test_preprocess_rejects_an_unknown_crop_rounding():
    with pytest.raises(ValueError, match="crop_rounding must be 'floor' or 'round', got 'ceil'"):
        preprocess(rand_images(), 16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop_rounding="ceil")


# --------------------------------------------------------------------------- latent rewards


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def plain_latent_reward(vae, reward, prompts, latents):
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return reward((images / 2 + 0.5).clamp(0, 1), prompts)


@pytest.mark.parametrize("decode_chunk,checkpoint_vae", [(1, True), (3, True), (2, False), (8, True)])
def test_latent_reward_equals_plain_decode_and_reward(vae, decode_chunk, checkpoint_vae):
    prompts = demo_data.PROMPTS[:5]
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reward = get_reward("color_match")

    reference_latents = latents.clone().requires_grad_(True)
    expected = plain_latent_reward(vae, reward, prompts, reference_latents)
    expected.sum().backward()

    reward_fn = latent_reward(vae, "color_match", prompts, decode_chunk=decode_chunk, checkpoint_vae=checkpoint_vae)
    assert reward_fn.differentiable
    x0 = latents.clone().requires_grad_(True)
    values = reward_fn(x0)
    values.sum().backward()
    torch.testing.assert_close(values, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x0.grad, reference_latents.grad, rtol=1e-4, atol=1e-7)
    assert reference_latents.grad.abs().sum() > 0


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` builds its graph
    (the VAE's frozen parameters excluded: they are alive anyway)."""
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if not isinstance(tensor, torch.nn.Parameter):
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    out.sum().backward()
    return sum(saved.values())


def test_chunked_checkpointed_decode_keeps_far_less_for_backward(vae):
    batch = 4
    prompts = demo_data.PROMPTS[:batch]
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    reward = get_reward("color_match")

    def with_grad(fn, x):
        return lambda: fn(x.clone().requires_grad_(True))

    plain = saved_bytes(with_grad(lambda x: plain_latent_reward(vae, reward, prompts, x), latents))
    stored = saved_bytes(with_grad(latent_reward(vae, reward, prompts, decode_chunk=1), latents))
    # the backward then recomputes one sample's decode at a time: what a plain decode of one sample saves
    recomputed = saved_bytes(with_grad(lambda x: plain_latent_reward(vae, reward, prompts[:1], x), latents[:1]))
    assert stored < plain / 50  # the forward keeps the latents and the reward's small graph only
    assert stored + recomputed < 1.2 * plain / batch  # peak: about one sample's decoder graph of `batch`
    unchunked = saved_bytes(with_grad(latent_reward(vae, reward, prompts, decode_chunk=batch, checkpoint_vae=False),
                                      latents))
    assert unchunked > plain / 2  # no checkpointing: the whole decoder graph is kept, as plain


def test_latent_reward_without_gradients_and_bad_inputs(vae):
    prompts = demo_data.PROMPTS[:3]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    jpeg = latent_reward(vae, "jpeg_incompressibility", prompts, decode_chunk=2)
    assert not jpeg.differentiable
    values = jpeg(latents)
    assert values.shape == (3,) and not values.requires_grad
    with torch.no_grad():
        images = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(values, get_reward("jpeg_incompressibility")(images, prompts))

    color = latent_reward(vae, "color_match", prompts)
    with torch.no_grad():
        assert not color(latents).requires_grad
    with pytest.raises(ValueError, match="4 samples but 3 prompts"):
        color(torch.randn(4, 4, 8, 8))
    with pytest.raises(ValueError, match="3 channels, the vae expects 4"):
        color(torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="decode_chunk must be a positive int.*0"):
        latent_reward(vae, "color_match", prompts, decode_chunk=0)
    with pytest.raises(TypeError, match="diffusers AutoencoderKL"):
        latent_reward(object(), "color_match", prompts)
