"""Offline converters from the released HPSv2 and ImageReward checkpoints to the transformers folders
the `hpsv2` and `imagereward` rewards load.

    rlr-fast convert hpsv2 --checkpoint HPS_v2.1_compressed.pt --tokenizer CLIP-ViT-H-14-laion2B-s32B-b79K \\
        --out weights/HPSv2
    rlr-fast convert imagereward --checkpoint ImageReward.pt --tokenizer bert-base-uncased --out weights/ImageReward

    from rlr_fast.rewards.convert import convert_hpsv2, convert_imagereward

Checkpoints are read with torch.load(weights_only=True): tensors and plain containers, never pickled
code. Every tensor is mapped or refused: a key the released layout does not have, or one it needs
that the file lacks, is a ValueError naming the keys. Sizes (layers, widths, patch and image size,
context length, vocabulary) are read off the tensors' shapes. Head counts are not in the tensors:
ViT-H/14's 16 per tower for HPSv2, ViT-L/16's 16 for ImageReward's vision tower, unless `heads` says
otherwise; ImageReward's text encoder takes its heads, layer-norm eps and activation from the med
config (med_config.json beside the checkpoint, else the released values in MED_CONFIG).
The output folder is written as `<out>.partial` and renamed when complete, so a crash leaves no
half-made folder where a reward would look.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from .clip_models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .imagereward import HEAD_FILE
from .loading import PathLike, torch_load_reason

Tensors = dict[str, torch.Tensor]
# source key -> the target tensors it becomes
KeyMap = dict[str, Callable[[torch.Tensor], Tensors]]

VIT_H_HEADS = 16
VIT_L_HEADS = 16
# The fields of ImageReward's med_config.json (BLIP's BERT) that the tensors do not determine.
MED_CONFIG = {"num_attention_heads": 12, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}


def rename(target: str) -> Callable[[torch.Tensor], Tensors]:
    return lambda tensor: {target: tensor}


def transpose(target: str) -> Callable[[torch.Tensor], Tensors]:
    """open_clip multiplies `x @ proj`; a transformers Linear computes `x @ weight.T`."""
    return lambda tensor: {target: tensor.T.contiguous()}


def split_in_proj(prefix: str, kind: str) -> Callable[[torch.Tensor], Tensors]:
    """nn.MultiheadAttention's packed in_proj (rows: q, then k, then v) -> separate q/k/v projections."""
    names = [f"{prefix}.{part}_proj.{kind}" for part in "qkv"]
    return lambda tensor: {name: chunk.clone() for name, chunk in zip(names, tensor.chunk(3))}


def load_checkpoint(path: PathLike, what: str) -> dict:
    """The released checkpoint's contents: a torch.load file read with weights_only=True, or a
    .safetensors file; errors name the file and what it is instead, never advising weights_only=False."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what}: --checkpoint {path} is a folder; give the released checkpoint file itself "
                                "(e.g. HPS_v2.1_compressed.pt or ImageReward.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for a damaged header or data
            raise ValueError(f"{what}: {path} is not a readable .safetensors file ({e}); is the download "
                             "complete?") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle error would otherwise surface as an unpickling trace
        raise ValueError(f"{what}: {path} cannot be read with torch.load(weights_only=True), which loads tensors and "
                         f"plain containers but never runs pickled code: {torch_load_reason(e)}. Convert the "
                         "released checkpoint file, not a training checkpoint that pickles other objects") from e


def check_out(out: PathLike, what: str) -> Path:
    """`out` as a folder the conversion may create: refused at once when it exists and is not empty."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{what}: {out} already exists and is not an empty folder; remove it or choose another --out")
    return out


def tensors_under(checkpoint, key: Optional[str], path: PathLike, what: str) -> Tensors:
    """The state dict of tensors at `checkpoint[key]` (or `checkpoint` itself when `key` is None)."""
    state = checkpoint.get(key) if key is not None and isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict):
        found = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{what}: {path} has no state dict{f' under {key!r}' if key else ''} (found {found})")
    not_tensors = sorted(k for k, v in state.items() if not torch.is_tensor(v))
    if not_tensors:
        raise ValueError(f"{what}: {path} holds non-tensor entries in its state dict: {not_tensors[:5]}")
    return state


def require(state: Tensors, keys, path: PathLike, what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{what}: {path} lacks {missing} of the released layout; is it the right checkpoint?")


def count_layers(state: Tensors, prefix: str) -> int:
    """1 + the largest N of keys `prefix.N.*`."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def apply_key_map(state: Tensors, key_map: KeyMap, optional: set[str], ignored: set[str], path: PathLike,
                  what: str) -> Tensors:
    """Every tensor of `state` through `key_map`; unknown or missing keys are a ValueError naming them."""
    from tqdm.auto import tqdm

    unknown = sorted(set(state) - set(key_map) - ignored)
    missing = sorted(set(key_map) - set(state) - optional)
    if unknown or missing:
        problems = [f"{len(names)} {kind} keys: {names[:8]}{' ...' if len(names) > 8 else ''}"
                    for kind, names in (("unknown", unknown), ("missing", missing)) if names]
        raise ValueError(f"{what}: {path} does not have the released layout; " + "; ".join(problems))
    out: Tensors = {}
    for key in tqdm([k for k in key_map if k in state], desc=f"converting {Path(path).name}", leave=False):
        out.update(key_map[key](state[key]))
    return out


def check_against_model(tensors: Tensors, model_class: type, config, unconverted: tuple[str, ...], what: str) -> None:
    """Every converted tensor has the name and shape `model_class(config)` expects, and every weight of
    the model outside the `unconverted` prefixes is provided (checked on the meta device: no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    extra = sorted(set(tensors) - set(expected))
    absent = sorted(k for k in set(expected) - set(tensors) if not k.startswith(unconverted))
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {expected[k]}" for k in sorted(set(tensors) & set(expected))
             if tuple(tensors[k].shape) != expected[k]]
    if extra or absent or wrong:
        raise ValueError(f"{what}: the converted tensors do not fit a {model_class.__name__} "
                         f"(unexpected {extra[:5]}, absent {absent[:5]}, shapes {wrong[:5]})")


def check_heads(width: int, heads: int, tower: str, what: str, source: str = "heads=N (--heads N)") -> None:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
        raise ValueError(f"{what}: {heads!r} attention heads do not divide the {tower} width {width}; set {source} "
                         "to a divisor of it")


def image_processor_config(size: int) -> dict:
    """CLIPImageProcessor settings of a resize-shortest-side, centre-crop, CLIP-normalise pipeline."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}


def write_folder(out: PathLike, config, files: dict[str, Tensors], image_size: int, tokenizer, what: str) -> Path:
    """config.json, the safetensors `files`, preprocessor_config.json and the tokenizer, into `out`."""
    from safetensors.torch import save_file

    out = check_out(out, what)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # left by an interrupted conversion
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    config.save_pretrained(partial)
    for name, tensors in files.items():
        print(f"{what}: writing {out / name}", flush=True)
        save_file(tensors, partial / name, metadata={"format": "pt"})
    (partial / "preprocessor_config.json").write_text(json.dumps(image_processor_config(image_size), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out


def load_tokenizer(tokenizer_class: type, folder: Optional[PathLike], what: str):
    if folder is None:
        return None
    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(f"{what}: --tokenizer {folder} is a file; give the tokenizer's folder (the one "
                                 "holding its vocabulary and tokenizer_config.json)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: tokenizer folder {folder} not found")
    try:
        tokenizer = tokenizer_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{what}: {folder} is not a {tokenizer_class.__name__} folder: {e}") from e
    return tokenizer


# --------------------------------------------------------------------------- HPSv2 (open_clip ViT-H/14)


def open_clip_block(source: str, target: str) -> KeyMap:
    """One open_clip ResidualAttentionBlock -> one transformers CLIPEncoderLayer."""
    key_map: KeyMap = {f"{source}.attn.in_proj_{kind}": split_in_proj(f"{target}.self_attn", kind)
                       for kind in ("weight", "bias")}
    for src, dst in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        key_map.update({f"{source}.{src}.{kind}": rename(f"{target}.{dst}.{kind}") for kind in ("weight", "bias")})
    return key_map


def open_clip_key_map(vision_layers: int, text_layers: int) -> KeyMap:
    key_map: KeyMap = {
        "token_embedding.weight": rename("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": rename("text_model.embeddings.position_embedding.weight"),
        "text_projection": transpose("text_projection.weight"),
        "logit_scale": rename("logit_scale"),
        "visual.class_embedding": rename("vision_model.embeddings.class_embedding"),
        "visual.conv1.weight": rename("vision_model.embeddings.patch_embedding.weight"),
        "visual.positional_embedding": rename("vision_model.embeddings.position_embedding.weight"),
        "visual.proj": transpose("visual_projection.weight"),
    }
    for source, target in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                           ("visual.ln_post", "vision_model.post_layernorm")):
        key_map.update({f"{source}.{kind}": rename(f"{target}.{kind}") for kind in ("weight", "bias")})
    for n in range(text_layers):
        key_map.update(open_clip_block(f"transformer.resblocks.{n}", f"text_model.encoder.layers.{n}"))
    for n in range(vision_layers):
        key_map.update(open_clip_block(f"visual.transformer.resblocks.{n}", f"vision_model.encoder.layers.{n}"))
    return key_map


def clip_config_of(state: Tensors, heads: int, what: str):
    """The transformers CLIPConfig of an open_clip state dict, sizes read off its tensors."""
    from transformers import CLIPConfig

    vocab_size, text_width = state["token_embedding.weight"].shape
    context_length = state["positional_embedding"].shape[0]
    vision_width, _, patch_size, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise ValueError(f"{what}: visual.positional_embedding has {state['visual.positional_embedding'].shape[0]} "
                         "rows, not a square patch grid plus the class token")
    projection_dim = state["visual.proj"].shape[1]
    for width, tower in ((vision_width, "vision"), (text_width, "text")):
        check_heads(width, heads, tower, what)
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5, num_attention_heads=heads, projection_dim=projection_dim)
    text = dict(vocab_size=vocab_size, hidden_size=text_width, max_position_embeddings=context_length,
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=count_layers(state, "transformer.resblocks"),
                # open_clip pools the text at its end-of-text token, the vocabulary's last id
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0, **common)
    vision = dict(hidden_size=vision_width, image_size=grid * patch_size, patch_size=patch_size,
                  intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=count_layers(state, "visual.transformer.resblocks"), **common)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    config.architectures = ["CLIPModel"]
    return config


def convert_hpsv2(checkpoint: PathLike, out: PathLike, *, tokenizer: Optional[PathLike] = None,
                  heads: int = VIT_H_HEADS) -> Path:
    """HPS_v2_compressed.pt / HPS_v2.1_compressed.pt (open_clip ViT-H/14 under 'state_dict') -> a
    transformers CLIPModel folder for `get_reward("hpsv2", path=out)`.

    `tokenizer`: a local CLIP tokenizer folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's), copied in.
    """
    from transformers import CLIPModel, CLIPTokenizer

    what = "convert hpsv2"
    check_out(out, what)  # a bad --out or --tokenizer stops before the conversion
    clip_tokenizer = load_tokenizer(CLIPTokenizer, tokenizer, what)
    state = tensors_under(load_checkpoint(checkpoint, what), "state_dict", checkpoint, what)
    require(state, ("token_embedding.weight", "positional_embedding", "visual.conv1.weight",
                    "visual.positional_embedding", "visual.proj", "transformer.resblocks.0.mlp.c_fc.weight",
                    "visual.transformer.resblocks.0.mlp.c_fc.weight"), checkpoint, what)
    config = clip_config_of(state, heads, what)
    key_map = open_clip_key_map(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers)
    # attn_mask: open_clip's causal text mask, a buffer some versions save (transformers builds its own)
    tensors = apply_key_map(state, key_map, optional=set(), ignored={"attn_mask"}, path=checkpoint, what=what)
    check_against_model(tensors, CLIPModel, config, (), what)
    text = config.text_config
    if clip_tokenizer is not None:
        ids = (len(clip_tokenizer), clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id)
        if ids != (text.vocab_size, text.bos_token_id, text.eos_token_id):
            raise ValueError(f"{what}: tokenizer {tokenizer} (vocabulary, start, end ids {ids}) does not belong to the "
                             f"checkpoint ({text.vocab_size}, {text.bos_token_id}, {text.eos_token_id})")
    return write_folder(out, config, {"model.safetensors": tensors}, config.vision_config.image_size, clip_tokenizer,
                        what)


# --------------------------------------------------------------------------- ImageReward (BLIP ViT-L + BERT)


def bert_key_names(layers: int) -> list[str]:
    """BLIP's BertModel (med.py) parameter names, which transformers' BlipTextModel shares."""
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"]
    modules = ["embeddings.LayerNorm"]
    for n in range(layers):
        for attention in ("attention", "crossattention"):
            modules += [f"encoder.layer.{n}.{attention}.self.{part}" for part in ("query", "key", "value")]
            modules += [f"encoder.layer.{n}.{attention}.output.dense", f"encoder.layer.{n}.{attention}.output.LayerNorm"]
        modules += [f"encoder.layer.{n}.intermediate.dense", f"encoder.layer.{n}.output.dense",
                    f"encoder.layer.{n}.output.LayerNorm"]
    return names + [f"{module}.{kind}" for module in modules for kind in ("weight", "bias")]


def blip_key_map(vision_layers: int, text_layers: int) -> KeyMap:
    vit, hf = "blip.visual_encoder", "vision_model"
    key_map: KeyMap = {
        f"{vit}.cls_token": rename(f"{hf}.embeddings.class_embedding"),
        f"{vit}.pos_embed": rename(f"{hf}.embeddings.position_embedding"),
    }
    pairs = [(f"{vit}.patch_embed.proj", f"{hf}.embeddings.patch_embedding"), (f"{vit}.norm", f"{hf}.post_layernorm"),
             ("blip.vision_proj", "vision_proj"), ("blip.text_proj", "text_proj")]
    for n in range(vision_layers):
        pairs += [(f"{vit}.blocks.{n}.{src}", f"{hf}.encoder.layers.{n}.{dst}")
                  for src, dst in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                                   ("attn.proj", "self_attn.projection"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))]
    for source, target in pairs:
        key_map.update({f"{source}.{kind}": rename(f"{target}.{kind}") for kind in ("weight", "bias")})
    key_map.update({f"blip.text_encoder.{name}": rename(f"text_encoder.{name}") for name in bert_key_names(text_layers)})
    key_map.update({f"mlp.layers.{n}.{kind}": rename(f"head.layers.{n}.{kind}")
                    for n in (0, 2, 4, 6, 7) for kind in ("weight", "bias")})
    return key_map


def med_config_of(path: Optional[PathLike], checkpoint: PathLike, what: str) -> tuple[dict, str]:
    """The med config's settings the tensors do not give, and where they came from."""
    path = Path(path) if path is not None else Path(checkpoint).with_name("med_config.json")
    if not path.is_file():
        return dict(MED_CONFIG), "the released med_config.json values"
    med = json.loads(path.read_text())
    if not med.get("add_cross_attention", False) or med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{what}: {path} is not ImageReward's med config (needs add_cross_attention true and "
                         "absolute position embeddings)")
    return {key: med.get(key, default) for key, default in MED_CONFIG.items()}, str(path)


def blip_config_of(state: Tensors, med: dict, heads: int, tokenizer, what: str):
    from transformers import BlipConfig

    vit = "blip.visual_encoder"
    vision_width, _, patch_size, _ = state[f"{vit}.patch_embed.proj.weight"].shape
    tokens = state[f"{vit}.pos_embed"].shape[1]
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens:
        raise ValueError(f"{what}: {vit}.pos_embed has {tokens} tokens, not a square patch grid plus the class token")
    vocab_size, text_width = state["blip.text_encoder.embeddings.word_embeddings.weight"].shape
    check_heads(vision_width, heads, "vision", what)
    check_heads(text_width, med["num_attention_heads"], "text", what, "num_attention_heads in the med config")
    vision = dict(hidden_size=vision_width, image_size=grid * patch_size, patch_size=patch_size,
                  intermediate_size=state[f"{vit}.blocks.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=count_layers(state, f"{vit}.blocks"), num_attention_heads=heads,
                  layer_norm_eps=1e-6, hidden_act="gelu")
    text = dict(vocab_size=vocab_size, hidden_size=text_width, encoder_hidden_size=vision_width,
                intermediate_size=state["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                num_hidden_layers=count_layers(state, "blip.text_encoder.encoder.layer"),
                max_position_embeddings=state["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0],
                # BLIP's tokenizer appends [DEC] (its start token) and [ENC] to bert-base-uncased's vocabulary
                bos_token_id=vocab_size - 2, sep_token_id=tokenizer.sep_token_id if tokenizer else 102, **med)
    projection = state.get("blip.vision_proj.weight")
    config = BlipConfig(text_config=text, vision_config=vision,
                        image_text_hidden_size=projection.shape[0] if projection is not None else 256)
    config.architectures = ["BlipForImageTextRetrieval"]
    return config


def convert_imagereward(checkpoint: PathLike, out: PathLike, *, tokenizer: Optional[PathLike] = None,
                        med_config: Optional[PathLike] = None, heads: int = VIT_L_HEADS) -> Path:
    """ImageReward.pt (BLIP ViT-L/16 + BERT with cross-attention + the 5-layer MLP head) -> a
    transformers BlipForImageTextRetrieval folder plus head.safetensors, for `get_reward("imagereward",
    path=out)`. `tokenizer`: a local bert-base-uncased tokenizer folder, copied in. `med_config`:
    ImageReward's med_config.json (default: the one beside the checkpoint, else the released values).
    """
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    what = "convert imagereward"
    check_out(out, what)  # a bad --out or --tokenizer stops before the conversion
    bert_tokenizer = load_tokenizer(BertTokenizer, tokenizer, what)
    state = tensors_under(load_checkpoint(checkpoint, what), None, checkpoint, what)
    vit, bert = "blip.visual_encoder", "blip.text_encoder"
    require(state, (f"{vit}.patch_embed.proj.weight", f"{vit}.pos_embed", f"{vit}.blocks.0.mlp.fc1.weight",
                    f"{bert}.embeddings.word_embeddings.weight", f"{bert}.embeddings.position_embeddings.weight",
                    f"{bert}.encoder.layer.0.intermediate.dense.weight"), checkpoint, what)
    med, med_source = med_config_of(med_config, checkpoint, what)
    config = blip_config_of(state, med, heads, bert_tokenizer, what)
    key_map = blip_key_map(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers)
    # The projections serve BLIP's contrastive loss, not ImageReward's score: kept when present.
    optional = {f"blip.{proj}.{kind}" for proj in ("vision_proj", "text_proj") for kind in ("weight", "bias")}
    tensors = apply_key_map(state, key_map, optional, ignored={f"{bert}.embeddings.position_ids"}, path=checkpoint,
                            what=what)
    head = {k.removeprefix("head."): tensors.pop(k) for k in list(tensors) if k.startswith("head.")}
    check_against_model(tensors, BlipForImageTextRetrieval, config, ("itm_head.", "vision_proj.", "text_proj."), what)
    if bert_tokenizer is not None and len(bert_tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"{what}: tokenizer {tokenizer} has {len(bert_tokenizer)} tokens, more than the checkpoint's "
                         f"{config.text_config.vocab_size} embeddings")
    print(f"{what}: text encoder settings from {med_source}: {med}")
    return write_folder(out, config, {"model.safetensors": tensors, HEAD_FILE: head},
                        config.vision_config.image_size, bert_tokenizer, what)


CONVERTERS = {"hpsv2": convert_hpsv2, "imagereward": convert_imagereward}


def convert(model: str, checkpoint: PathLike, out: PathLike, *, tokenizer: Optional[PathLike] = None,
            heads: Optional[int] = None, med_config: Optional[PathLike] = None) -> str:
    """What `rlr-fast convert` runs: one converter, and a line saying what it wrote and what is left to do."""
    if model not in CONVERTERS:
        raise ValueError(f"convert: unknown model {model!r}; choose one of {sorted(CONVERTERS)}")
    if med_config is not None and model != "imagereward":
        raise ValueError("convert: --med-config applies to imagereward only")
    options = {"tokenizer": tokenizer, **({"heads": heads} if heads is not None else {}),
               **({"med_config": med_config} if med_config is not None else {})}
    folder = CONVERTERS[model](checkpoint, out, **options)
    done = f"wrote {folder}: get_reward({model!r}, path={str(folder)!r}), or --set 'reward_kwargs={{path: {folder}}}'"
    if tokenizer is None:
        kind = "a CLIP tokenizer (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)" if model == "hpsv2" else "bert-base-uncased"
        done += f"; it has no tokenizer yet: copy the tokenizer files of {kind} into it, or rerun with --tokenizer DIR"
    return done
