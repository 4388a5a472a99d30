"""Converters of the released HPSv2 and ImageReward checkpoints (`rlr-fast convert`).

Each test builds a tiny random checkpoint with the key names and tensor layouts of the released file
(open_clip's CLIP state dict under 'state_dict'; ImageReward's flat state dict of BLIP's ViT, BLIP's
BERT with cross-attention and the MLP head), converts it, loads the reward from the converted folder
and compares its scores to a forward pass written here from the ORIGINAL layout (packed attention
in_proj, `x @ proj`, timm's qkv, BERT's additive mask), independent of the converter's key mapping.
"""

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlr_fast import demo_data
from rlr_fast.cli import main
from rlr_fast.models import write_byte_tokenizer
from rlr_fast.rewards import get_reward
from rlr_fast.rewards.convert import convert_hpsv2, convert_imagereward

IMAGE_SIZE, PATCH = 32, 8
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
# Embeddings this small (variance ~1e-5) make the first LayerNorms' eps matter, so a wrong eps shows.
TINY = 0.003
PROMPTS = ["a red circle on a blue background", "a green triangle", "an orange square on a white background"]


class Random:
    """Random tensors with sensible scales, so the tiny networks' outputs depend on every weight."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std

    def linear(self, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normal(out_dim, in_dim, std=in_dim ** -0.5), self.normal(out_dim, std=0.1)

    def norm(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 + self.normal(dim, std=0.1), self.normal(dim, std=0.1)


def put(state: dict, prefix: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = pair


def images_batch(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - CLIP_MEAN) / CLIP_STD


def linear(x, state, prefix):
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def layer_norm(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)


def heads_split(x, heads):
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


def attend(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    out = scores.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


# --------------------------------------------------------------------------- HPSv2: open_clip CLIP


def open_clip_block(state, prefix, width, rng):
    put(state, f"{prefix}.ln_1", rng.norm(width))
    state[f"{prefix}.attn.in_proj_weight"] = rng.normal(3 * width, width, std=width ** -0.5)
    state[f"{prefix}.attn.in_proj_bias"] = rng.normal(3 * width, std=0.1)
    put(state, f"{prefix}.attn.out_proj", rng.linear(width, width))
    put(state, f"{prefix}.ln_2", rng.norm(width))
    put(state, f"{prefix}.mlp.c_fc", rng.linear(4 * width, width))
    put(state, f"{prefix}.mlp.c_proj", rng.linear(width, 4 * width))


def open_clip_state(vocab_size: int, seed: int = 0, text_width: int = 32, vision_width: int = 48, layers: int = 2,
                    embed_dim: int = 24, context: int = 77) -> dict:
    """open_clip's CLIP (ViT-H/14 layout: text tower at the top level, vision tower under `visual.`)."""
    rng = Random(seed)
    grid = IMAGE_SIZE // PATCH
    state = {"token_embedding.weight": rng.normal(vocab_size, text_width, std=TINY),
             "positional_embedding": rng.normal(context, text_width, std=TINY),
             "text_projection": rng.normal(text_width, embed_dim, std=text_width ** -0.5),
             "logit_scale": torch.tensor(math.log(1 / 0.07)),
             "visual.class_embedding": rng.normal(vision_width, std=TINY),
             "visual.positional_embedding": rng.normal(grid * grid + 1, vision_width, std=TINY),
             "visual.conv1.weight": rng.normal(vision_width, 3, PATCH, PATCH, std=TINY / PATCH),
             "visual.proj": rng.normal(vision_width, embed_dim, std=vision_width ** -0.5)}
    put(state, "ln_final", rng.norm(text_width))
    put(state, "visual.ln_pre", rng.norm(vision_width))
    put(state, "visual.ln_post", rng.norm(vision_width))
    for n in range(layers):
        open_clip_block(state, f"transformer.resblocks.{n}", text_width, rng)
        open_clip_block(state, f"visual.transformer.resblocks.{n}", vision_width, rng)
    return state


def residual_attention_block(x, state, prefix, heads, mask=None):
    """open_clip's ResidualAttentionBlock: nn.MultiheadAttention with its packed in_proj, then the MLP."""
    h = layer_norm(x, state, f"{prefix}.ln_1", 1e-5)
    q, k, v = (h @ state[f"{prefix}.attn.in_proj_weight"].T + state[f"{prefix}.attn.in_proj_bias"]).chunk(3, dim=-1)
    x = x + linear(attend(heads_split(q, heads), heads_split(k, heads), heads_split(v, heads), mask),
                   state, f"{prefix}.attn.out_proj")
    h = F.gelu(linear(layer_norm(x, state, f"{prefix}.ln_2", 1e-5), state, f"{prefix}.mlp.c_fc"))
    return x + linear(h, state, f"{prefix}.mlp.c_proj")


def open_clip_encode_image(state, pixels, heads):
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = layer_norm(torch.cat([cls, x], dim=1) + state["visual.positional_embedding"], state, "visual.ln_pre", 1e-5)
    for n in range(2):
        x = residual_attention_block(x, state, f"visual.transformer.resblocks.{n}", heads)
    return layer_norm(x[:, 0], state, "visual.ln_post", 1e-5) @ state["visual.proj"]


def open_clip_encode_text(state, token_ids, heads):
    """token_ids: open_clip's [start] text [end] then zeros; pooled at the end token (the largest id)."""
    length = token_ids.shape[1]
    x = state["token_embedding.weight"][token_ids] + state["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for n in range(2):
        x = residual_attention_block(x, state, f"transformer.resblocks.{n}", heads, causal)
    x = layer_norm(x, state, "ln_final", 1e-5)
    return x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ state["text_projection"]


def open_clip_tokens(tokenizer, prompts, context=77):
    rows = [tokenizer(p)["input_ids"][:context] for p in prompts]
    return torch.tensor([row + [0] * (context - len(row)) for row in rows])


@pytest.fixture
def clip_tokenizer_folder(tmp_path) -> tuple[Path, int]:
    folder = tmp_path / "clip_tokenizer"
    return folder, write_byte_tokenizer(folder)


def test_hpsv2_scores_equal_open_clip_forward_of_the_released_layout(tmp_path, clip_tokenizer_folder):
    from transformers import CLIPTokenizer

    tokenizer_folder, vocab_size = clip_tokenizer_folder
    state = open_clip_state(vocab_size)
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state}, checkpoint)
    out = convert_hpsv2(checkpoint, tmp_path / "HPSv2", tokenizer=tokenizer_folder, heads=4)
    assert out == tmp_path / "HPSv2" and not (tmp_path / "HPSv2.partial").exists()

    reward = get_reward("hpsv2", path=out)
    images = images_batch(3, seed=1).requires_grad_(True)
    values = reward(images, PROMPTS)
    values.sum().backward()
    assert images.grad.abs().sum() > 0

    token_ids = open_clip_tokens(CLIPTokenizer.from_pretrained(tokenizer_folder), PROMPTS)
    with torch.no_grad():
        image_features = open_clip_encode_image(state, normalise(images), heads=4)
        text_features = open_clip_encode_text(state, token_ids, heads=4)
    expected = F.cosine_similarity(image_features, text_features, dim=-1)  # HPSv2: diag(img @ txt.T), normalised
    torch.testing.assert_close(values.detach(), expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.02  # the scores differ by image and prompt: a wrong weight would show


# --------------------------------------------------------------------------- ImageReward: BLIP + BERT + MLP


def vit_block(state, prefix, width, rng):
    put(state, f"{prefix}.norm1", rng.norm(width))
    put(state, f"{prefix}.attn.qkv", rng.linear(3 * width, width))
    put(state, f"{prefix}.attn.proj", rng.linear(width, width))
    put(state, f"{prefix}.norm2", rng.norm(width))
    put(state, f"{prefix}.mlp.fc1", rng.linear(4 * width, width))
    put(state, f"{prefix}.mlp.fc2", rng.linear(width, 4 * width))


def bert_attention_module(state, prefix, width, context_width, rng):
    put(state, f"{prefix}.self.query", rng.linear(width, width))
    put(state, f"{prefix}.self.key", rng.linear(width, context_width))
    put(state, f"{prefix}.self.value", rng.linear(width, context_width))
    put(state, f"{prefix}.output.dense", rng.linear(width, width))
    put(state, f"{prefix}.output.LayerNorm", rng.norm(width))


def imagereward_state(vocab_size: int, seed: int = 0, vision_width: int = 48, text_width: int = 32,
                      layers: int = 2, max_positions: int = 40) -> dict:
    """ImageReward.pt: blip.visual_encoder (BLIP's ViT), blip.text_encoder (BLIP's BertModel with
    cross-attention), blip.vision_proj / text_proj, and the head as mlp.layers.{0,2,4,6,7}."""
    rng = Random(seed)
    vit, bert = "blip.visual_encoder", "blip.text_encoder"
    grid = IMAGE_SIZE // PATCH
    state = {f"{vit}.cls_token": rng.normal(1, 1, vision_width, std=TINY),
             f"{vit}.pos_embed": rng.normal(1, grid * grid + 1, vision_width, std=TINY),
             f"{bert}.embeddings.word_embeddings.weight": rng.normal(vocab_size, text_width, std=TINY),
             f"{bert}.embeddings.position_embeddings.weight": rng.normal(max_positions, text_width, std=TINY),
             f"{bert}.embeddings.position_ids": torch.arange(max_positions)[None]}
    put(state, f"{vit}.patch_embed.proj", (rng.normal(vision_width, 3, PATCH, PATCH, std=TINY / PATCH),
                                           rng.normal(vision_width, std=TINY)))
    put(state, f"{vit}.norm", rng.norm(vision_width))
    put(state, f"{bert}.embeddings.LayerNorm", rng.norm(text_width))
    for n in range(layers):
        vit_block(state, f"{vit}.blocks.{n}", vision_width, rng)
        layer = f"{bert}.encoder.layer.{n}"
        bert_attention_module(state, f"{layer}.attention", text_width, text_width, rng)
        bert_attention_module(state, f"{layer}.crossattention", text_width, vision_width, rng)
        put(state, f"{layer}.intermediate.dense", rng.linear(4 * text_width, text_width))
        put(state, f"{layer}.output.dense", rng.linear(text_width, 4 * text_width))
        put(state, f"{layer}.output.LayerNorm", rng.norm(text_width))
    put(state, "blip.vision_proj", rng.linear(16, vision_width))
    put(state, "blip.text_proj", rng.linear(16, text_width))
    for index, (out_dim, in_dim) in {0: (1024, text_width), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items():
        put(state, f"mlp.layers.{index}", rng.linear(out_dim, in_dim))
    return state


def blip_image_tokens(state, pixels, heads):
    """BLIP's VisionTransformer (timm layout): qkv as one Linear, reshaped (B, N, 3, heads, d); LayerNorm eps 1e-6."""
    vit = "blip.visual_encoder"
    x = F.conv2d(pixels, state[f"{vit}.patch_embed.proj.weight"], state[f"{vit}.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[f"{vit}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state[f"{vit}.pos_embed"]
    for n in range(2):
        prefix = f"{vit}.blocks.{n}"
        h = layer_norm(x, state, f"{prefix}.norm1", 1e-6)
        batch, length, width = h.shape
        q, k, v = linear(h, state, f"{prefix}.attn.qkv").reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        x = x + linear(attend(q, k, v), state, f"{prefix}.attn.proj")
        h = F.gelu(linear(layer_norm(x, state, f"{prefix}.norm2", 1e-6), state, f"{prefix}.mlp.fc1"))
        x = x + linear(h, state, f"{prefix}.mlp.fc2")
    return layer_norm(x, state, f"{vit}.norm", 1e-6)


def bert_attention(x, context, state, prefix, heads, mask):
    q, k, v = (heads_split(linear(source, state, f"{prefix}.self.{name}"), heads)
               for source, name in ((x, "query"), (context, "key"), (context, "value")))
    out = linear(attend(q, k, v, mask), state, f"{prefix}.output.dense")
    return layer_norm(out + x, state, f"{prefix}.output.LayerNorm", 1e-12)


def imagereward_reference(state, pixels, token_ids, attention_mask, vision_heads, text_heads):
    """ImageReward.score: BLIP's BERT in 'multimodal' mode over the image tokens, [CLS] through the MLP, standardised."""
    bert = "blip.text_encoder"
    image_tokens = blip_image_tokens(state, pixels, vision_heads)
    length = token_ids.shape[1]
    x = state[f"{bert}.embeddings.word_embeddings.weight"][token_ids]
    x = x + state[f"{bert}.embeddings.position_embeddings.weight"][:length]
    x = layer_norm(x, state, f"{bert}.embeddings.LayerNorm", 1e-12)
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # BertModel's extended attention mask
    for n in range(2):
        layer = f"{bert}.encoder.layer.{n}"
        x = bert_attention(x, x, state, f"{layer}.attention", text_heads, padding)
        x = bert_attention(x, image_tokens, state, f"{layer}.crossattention", text_heads, None)
        h = F.gelu(linear(x, state, f"{layer}.intermediate.dense"))
        x = layer_norm(linear(h, state, f"{layer}.output.dense") + x, state, f"{layer}.output.LayerNorm", 1e-12)
    raw = x[:, 0]
    for index in (0, 2, 4, 6, 7):  # the head's ReLUs are commented out in ImageReward's MLP
        raw = linear(raw, state, f"mlp.layers.{index}")
    return (raw.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072  # ImageReward's self.mean, self.std


@pytest.fixture
def bert_tokenizer_folder(tmp_path) -> tuple[Path, int]:
    folder = tmp_path / "bert-base-uncased"
    folder.mkdir()
    words = sorted({w for p in demo_data.PROMPTS + PROMPTS for w in p.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder, len(vocab) + 2  # BLIP's tokenizer adds [DEC] and [ENC]


def write_med_config(folder: Path, text_heads: int) -> None:
    import json

    (folder / "med_config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 32, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": text_heads,
        "num_hidden_layers": 2, "pad_token_id": 0, "vocab_size": 99, "encoder_width": 48, "add_cross_attention": True}))


def test_imagereward_scores_equal_blip_forward_of_the_released_layout(tmp_path, bert_tokenizer_folder, capsys):
    from transformers import BertTokenizer

    tokenizer_folder, vocab_size = bert_tokenizer_folder
    state = imagereward_state(vocab_size)
    torch.save(state, tmp_path / "ImageReward.pt")
    write_med_config(tmp_path, text_heads=2)  # beside the checkpoint, as the Hub repo has it
    out = tmp_path / "ImageReward"
    assert main(["convert", "imagereward", "--checkpoint", str(tmp_path / "ImageReward.pt"), "--out", str(out),
                 "--tokenizer", str(tokenizer_folder), "--heads", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "'num_attention_heads': 2" in printed

    reward = get_reward("imagereward", path=out)
    images = images_batch(3, seed=2).requires_grad_(True)
    values = reward(images, PROMPTS)
    values.sum().backward()
    assert images.grad.abs().sum() > 0

    tokens = BertTokenizer.from_pretrained(tokenizer_folder)(PROMPTS, padding="max_length", max_length=35,
                                                             truncation=True, return_tensors="pt")
    assert (tokens.attention_mask == 0).any()  # padding is exercised
    with torch.no_grad():
        expected = imagereward_reference(state, normalise(images), tokens.input_ids, tokens.attention_mask,
                                         vision_heads=4, text_heads=2)
    torch.testing.assert_close(values.detach(), expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.05


# --------------------------------------------------------------------------- errors


def test_unknown_or_missing_keys_are_named_and_nothing_is_written(tmp_path, clip_tokenizer_folder):
    tokenizer_folder, vocab_size = clip_tokenizer_folder
    state = open_clip_state(vocab_size)
    extra = {**state, "visual.transformer.resblocks.0.attn.rel_pos": torch.zeros(3)}
    torch.save({"state_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"1 unknown keys: \['visual.transformer.resblocks.0.attn.rel_pos'\]"):
        convert_hpsv2(tmp_path / "extra.pt", tmp_path / "out", heads=4)
    lacking = {k: v for k, v in state.items() if k not in ("transformer.resblocks.1.ln_2.bias", "visual.proj")}
    torch.save({"state_dict": lacking}, tmp_path / "lacking.pt")
    with pytest.raises(ValueError, match=r"lacks \['visual.proj'\]"):
        convert_hpsv2(tmp_path / "lacking.pt", tmp_path / "out", heads=4)
    lacking["visual.proj"] = state["visual.proj"]
    torch.save({"state_dict": lacking}, tmp_path / "lacking.pt")
    with pytest.raises(ValueError, match=r"1 missing keys: \['transformer.resblocks.1.ln_2.bias'\]"):
        convert_hpsv2(tmp_path / "lacking.pt", tmp_path / "out", heads=4)
    torch.save(state, tmp_path / "flat.pt")  # HPSv2 keeps the tensors under 'state_dict'
    with pytest.raises(ValueError, match="no state dict under 'state_dict'"):
        convert_hpsv2(tmp_path / "flat.pt", tmp_path / "out", heads=4)

    blip = imagereward_state(vocab_size=40)
    del blip["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    blip["blip.itm_head.weight"] = torch.zeros(2, 32)
    torch.save(blip, tmp_path / "ImageReward.pt")
    write_med_config(tmp_path, text_heads=2)
    with pytest.raises(ValueError, match=r"unknown keys: \['blip.itm_head.weight'\]; 1 missing keys: "
                                         r"\['blip.text_encoder.encoder.layer.1.crossattention.self.key.weight'\]"):
        convert_imagereward(tmp_path / "ImageReward.pt", tmp_path / "out", heads=4)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_converters_refuse_bad_files_and_options_with_clear_errors(tmp_path, clip_tokenizer_folder, capsys):
    tokenizer_folder, vocab_size = clip_tokenizer_folder
    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": open_clip_state(vocab_size)}, checkpoint)
    with pytest.raises(ValueError, match="10 attention heads do not divide the vision width 48"):
        convert_hpsv2(checkpoint, tmp_path / "out", heads=10)
    with pytest.raises(ValueError, match=r"tokenizer .* \(vocabulary, start, end ids \(514, 512, 513\)\) does not "
                                         r"belong to the checkpoint \(600, 598, 599\)"):
        torch.save({"state_dict": open_clip_state(600)}, tmp_path / "other_vocab.pt")
        convert_hpsv2(tmp_path / "other_vocab.pt", tmp_path / "out", tokenizer=tokenizer_folder, heads=4)

    pickled = tmp_path / "pickled.pt"  # a training checkpoint with its pickled arguments: weights_only refuses it
    torch.save({"state_dict": open_clip_state(vocab_size), "args": argparse.Namespace(lr=1e-5)}, pickled)
    with pytest.raises(ValueError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        convert_hpsv2(pickled, tmp_path / "out")

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        convert_hpsv2(checkpoint, occupied, heads=4)
    assert (occupied / "keep.txt").read_text() == "mine"

    # the CLI: one line and status 2 for a user error; without --tokenizer it says what is left to do
    assert main(["convert", "hpsv2", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "rlr-fast convert: error: convert hpsv2: checkpoint" in capsys.readouterr().err
    assert main(["convert", "hpsv2", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "bare"),
                 "--heads", "4"]) == 0
    assert "has no tokenizer yet" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no tokenizer files .* rlr-fast convert hpsv2 --checkpoint"):
        get_reward("hpsv2", path=tmp_path / "bare")


# ---- issue 24 §7: messages that name the real problem, found before the conversion runs


def test_convert_errors_name_the_problem_before_converting(tmp_path, clip_tokenizer_folder, capsys, monkeypatch):
    import rlr_fast.rewards.convert as convert_module

    tokenizer_folder, vocab_size = clip_tokenizer_folder
    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": open_clip_state(vocab_size)}, checkpoint)

    pickled = tmp_path / "pickled.pt"  # torch's own message advises weights_only=False: unsafe, never passed on
    torch.save({"state_dict": open_clip_state(vocab_size), "args": argparse.Namespace(lr=1e-5)}, pickled)
    with pytest.raises(ValueError) as e:
        convert_hpsv2(pickled, tmp_path / "out")
    assert "weights_only=False" not in str(e.value) and "WeightsUnpickler error" in str(e.value)
    assert "not a training checkpoint" in str(e.value)

    with pytest.raises(IsADirectoryError, match="is a folder; give the released checkpoint file itself"):
        convert_hpsv2(tmp_path, tmp_path / "out")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a readable .safetensors file") as e:
        convert_hpsv2(garbage, tmp_path / "out")
    assert "torch.load" not in str(e.value)

    # an occupied --out and a bad --tokenizer stop before the checkpoint is even read
    def no_reading(*args):
        raise AssertionError("the checkpoint was read before --out / --tokenizer were checked")

    monkeypatch.setattr(convert_module, "load_checkpoint", no_reading)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    for convert_fn in (convert_hpsv2, convert_imagereward):
        with pytest.raises(ValueError, match="already exists and is not an empty folder"):
            convert_fn(checkpoint, occupied)
        with pytest.raises(FileNotFoundError, match="tokenizer folder .*nowhere not found"):
            convert_fn(checkpoint, tmp_path / "new", tokenizer=tmp_path / "nowhere")
        with pytest.raises(NotADirectoryError, match="is a file; give the tokenizer's folder"):
            convert_fn(checkpoint, tmp_path / "new", tokenizer=checkpoint)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert main(["convert", "hpsv2", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "not found" not in err
