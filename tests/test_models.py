"""rlr_fast.models: local SD loading, the tiny offline pipeline, SD1.4 on meta, and LoRA files that
stock diffusers reads back exactly. Everything is built offline on the CPU."""

import json
import os
import re
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rlr_fast import models

from rlr_fast import lora


def _unet_inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    h = torch.randn(batch, 77, 32, generator=g)
    return x, torch.tensor([999, 500][:batch]), h


@torch.no_grad()
def _eps(unet, seed: int = 0) -> torch.Tensor:
    x, t, h = _unet_inputs(seed)
    return unet(x, t, encoder_hidden_states=h).sample


def _stock_pipeline(folder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _public(config) -> dict:
    """A diffusers config without its bookkeeping entries (_class_name, _diffusers_version, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _simulate_training(unet, seed: int = 0) -> None:
    """Non-zero LoRA weights, as after some optimizer steps (peft starts lora_B at zero)."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for p in lora.lora_parameters(unet):
            torch.nn.init.normal_(p, std=0.05)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tiny_sd(0) saved as a diffusers folder; tests must not write into it."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    models.tiny_sd(0).save_pretrained(folder)
    return folder


# ---- tiny_sd -------------------------------------------------------------------------------------

def test_tiny_sd_has_sd14_component_types_and_schedule():
    sd = models.tiny_sd(0)
    assert isinstance(sd.unet, UNet2DConditionModel) and isinstance(sd.vae, AutoencoderKL)
    assert isinstance(sd.text_encoder, CLIPTextModel) and isinstance(sd.tokenizer, CLIPTokenizer)
    assert isinstance(sd.scheduler, DDIMScheduler) and sd.path is None
    cfg = sd.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset, cfg.timestep_spacing) == (
        False, False, 1, "leading")
    for m in (sd.unet, sd.vae, sd.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    # a 2x VAE: 16 px images <-> 8x8 latents of 4 channels, the UNet's sample size
    with torch.no_grad():
        z = sd.vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8) and sd.unet.config.sample_size == 8


def test_tiny_sd_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = models.tiny_sd(0), models.tiny_sd(0), models.tiny_sd(1)
    assert torch.equal(torch.random.get_rng_state(), before)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(s, name).state_dict() for s in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point()), name


def test_tokenizer_and_encode_prompts_work_offline():
    sd = models.tiny_sd(0)
    ids = sd.tokenizer(["a cat!"], padding="max_length", max_length=77).input_ids[0]
    tok = sd.tokenizer
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    # a</w> c a t</w> !</w>: every byte has its own token (ids < 512), nothing maps to unknown
    assert ids[1:6] == tok.convert_tokens_to_ids(["a</w>", "c", "a", "t</w>", "!</w>"])
    assert max(ids[1:6]) < 512 and ids[6:] == [tok.eos_token_id] * 71
    emb = sd.encode_prompts(["a photo of a cat", "a dog", "😀 ünïcode"])
    assert emb.shape == (3, 77, 32) and emb.isfinite().all() and not emb.requires_grad
    assert not torch.allclose(emb[0], emb[1])


def test_byte_tokenizer_files_carry_clips_77_token_context(tmp_path):
    """Loaded without arguments, the written tokenizer pads to 77 (transformers' default is ~1e30)."""
    models.write_byte_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok.model_max_length == 77
    assert len(tok(["a cat"], padding="max_length", max_length=tok.model_max_length).input_ids[0]) == 77


# ---- save_pretrained / load_sd -------------------------------------------------------------------

def test_save_then_load_sd_round_trips_exactly(tiny_dir):
    sd = models.tiny_sd(0)
    loaded = models.load_sd(tiny_dir)
    assert loaded.path == tiny_dir
    assert torch.equal(_eps(loaded.unet), _eps(sd.unet))
    for name in ("vae", "text_encoder"):
        ref, got = getattr(sd, name).state_dict(), getattr(loaded, name).state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
        assert not getattr(loaded, name).training
    assert not any(p.requires_grad for p in loaded.unet.parameters()) and not loaded.unet.training
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert _public(loaded.scheduler.config) == _public(sd.scheduler.config)
    assert torch.equal(loaded.encode_prompts(["a cat"]), sd.encode_prompts(["a cat"]))


def test_stock_pipeline_reads_saved_folder(tiny_dir):
    pipe = _stock_pipeline(tiny_dir)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert torch.equal(_eps(pipe.unet), _eps(models.tiny_sd(0).unet))


def test_load_sd_subset_dtype_and_device(tiny_dir):
    sd = models.load_sd(tiny_dir, dtype=torch.float64, device="cpu", components=("unet", "scheduler"))
    assert sd.vae is None and sd.text_encoder is None and sd.tokenizer is None
    assert {p.dtype for p in sd.unet.parameters()} == {torch.float64}
    assert {p.device.type for p in sd.unet.parameters()} == {"cpu"}


def test_load_sd_turns_pndm_scheduler_config_into_ddim(tiny_dir, tmp_path, capsys):
    """SD1.4 ships a PNDMScheduler config, without clip_sample: load_sd must hand back DDIM with the
    same betas and clip_sample=False (DDIM's default, True, is not how SD samples), and say so once."""
    from rlr_fast.samplers import check_scheduler

    folder = tmp_path / "sd"
    models.tiny_sd(0).save_pretrained(folder)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                  skip_prk_steps=True, steps_offset=1).save_pretrained(folder / "scheduler")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler" and "clip_sample" not in config
    capsys.readouterr()
    sched = models.load_sd(folder, components=("scheduler",)).scheduler
    assert isinstance(sched, DDIMScheduler) and sched.config.clip_sample is False
    check_scheduler(sched)  # the rollout accepts it
    assert torch.equal(sched.alphas_cumprod, models.tiny_sd(0).scheduler.alphas_cumprod)
    notes = [line for line in capsys.readouterr().err.splitlines() if "clip_sample" in line]
    assert len(notes) == 1 and "scheduler_config.json has no clip_sample key (PNDMScheduler config)" in notes[0]


def test_load_sd_names_file_and_key_of_a_clipping_scheduler(tmp_path):
    folder = tmp_path / "sd"
    models.tiny_sd(0).save_pretrained(folder)
    file = folder / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "clip_sample": True}))
    with pytest.raises(ValueError, match=rf'{re.escape(str(file))} sets clip_sample: true.*set "clip_sample": false'):
        models.load_sd(folder, components=("scheduler",))


def test_load_sd_reads_safetensors_only_where_a_component_has_them(tmp_path, monkeypatch):
    """With safetensors present, no pickle path is tried (use_safetensors=True); a component saved
    only as a pickle still loads the way diffusers loads it."""
    folder = tmp_path / "sd"
    sd = models.tiny_sd(0)
    sd.save_pretrained(folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(sd.vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.bin")
    asked = {}
    for cls, name in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=name, _original=original, **kwargs):
            asked[_name] = kwargs.get("use_safetensors")
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    loaded = models.load_sd(folder)
    assert asked == {"unet": True, "vae": None, "text_encoder": True}
    assert torch.equal(_eps(loaded.unet), _eps(sd.unet))


def test_save_pretrained_refuses_a_unet_with_lora(tmp_path):
    sd = models.tiny_sd(0)
    lora.add_lora(sd.unet)
    with pytest.raises(ValueError, match="LoRA adapter"):
        sd.save_pretrained(tmp_path / "out")


# ---- load_sd errors ------------------------------------------------------------------------------

def test_load_sd_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        models.load_sd(missing)


def test_load_sd_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path}.*model_index\.json.*unet"):
        models.load_sd(tmp_path)


def test_load_sd_missing_component_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"'vae'.*{tmp_path / 'vae'}"):
        models.load_sd(tmp_path, components=("unet", "vae"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float16"])
def test_load_sd_rejects_non_float_dtype(tiny_dir, dtype):
    with pytest.raises(TypeError, match=re.escape(str(dtype))):
        models.load_sd(tiny_dir, dtype=dtype)


def test_load_sd_names_the_component_that_fails_to_load(tmp_path):
    folder = tmp_path / "sd"
    models.tiny_sd(0).save_pretrained(folder)
    (folder / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"'text_encoder'.*{folder / 'text_encoder'}") as info:
        models.load_sd(folder)
    assert info.value.__cause__ is not None


# ---- SD1.4 on meta -------------------------------------------------------------------------------

def test_sd14_on_meta_has_the_real_parameter_counts_and_no_storage():
    built = models.build_sd14_on_meta(("unet", "vae", "text_encoder"))
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in built.items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    for m in built.values():
        assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {"meta"}
    assert models.build_sd14_on_meta().keys() == {"unet"}
    with pytest.raises(ValueError, match="tokenizer"):
        models.build_sd14_on_meta(("tokenizer",))


# ---- LoRA ----------------------------------------------------------------------------------------

def test_add_lora_trains_only_lora_and_starts_as_a_no_op():
    unet = models.tiny_sd(0).unet.requires_grad_(True)  # as if the base had been trainable
    base = _eps(unet)
    lora.add_lora(unet, rank=4, alpha=4, seed=0)
    params = lora.lora_parameters(unet)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    # 4 projections x (A, B) x 8 attention layers (2 per transformer block, 4 blocks)
    assert len(params) == len(names) == 64 and all(".lora_" in n for n in names)
    assert torch.equal(_eps(unet), base)
    again = lora.add_lora(models.tiny_sd(0).unet, rank=4, alpha=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(params, lora.lora_parameters(again)))


@pytest.mark.parametrize("kwargs, match", [({"rank": 0}, "rank.*0"), ({"rank": -2}, "rank.*-2"),
                                           ({"alpha": 0}, "alpha.*0"), ({"alpha": -1.5}, r"alpha.*-1\.5")])
def test_add_lora_rejects_bad_rank_or_alpha(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.add_lora(models.tiny_sd(0).unet, **kwargs)


@pytest.mark.slow
def test_lora_round_trip_through_stock_diffusers(tiny_dir, tmp_path):
    """The important one: what we train is what `pipe.load_lora_weights` gives back.

    alpha != rank, so a file that lost the LoRA scaling would fail the comparison."""
    unet = models.tiny_sd(0).unet
    base = _eps(unet)
    lora.add_lora(unet, rank=4, alpha=8)
    _simulate_training(unet)
    trained = _eps(unet)
    assert (trained - base).abs().max() > 1e-3

    weights = lora.save_lora(unet, tmp_path / "lora")
    assert weights == tmp_path / "lora" / lora.LORA_WEIGHT_NAME and weights.is_file()

    pipe = _stock_pipeline(tiny_dir)
    assert torch.equal(_eps(pipe.unet), base)
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_eps(pipe.unet), trained, atol=1e-5, rtol=0)

    latents = pipe("a photo of a cat", num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and latents.isfinite().all()


def test_load_lora_reproduces_outputs_fresh_and_in_place(tmp_path):
    unet = lora.add_lora(models.tiny_sd(0).unet, rank=2, alpha=3, targets=("to_q", "to_v"))
    _simulate_training(unet)
    trained = _eps(unet)
    lora.save_lora(unet, tmp_path)

    fresh = lora.load_lora(models.tiny_sd(0).unet, tmp_path)
    torch.testing.assert_close(_eps(fresh), trained, atol=1e-6, rtol=0)
    assert len(lora.lora_parameters(fresh)) == len(lora.lora_parameters(unet))

    # into an existing adapter: same Parameter objects (an optimizer keeps working), new values
    target = lora.add_lora(models.tiny_sd(0).unet, rank=2, alpha=3, targets=("to_q", "to_v"))
    params = lora.lora_parameters(target)
    lora.load_lora(target, tmp_path)
    assert all(a is b for a, b in zip(params, lora.lora_parameters(target)))
    torch.testing.assert_close(_eps(target), trained, atol=1e-6, rtol=0)


def test_load_lora_rejects_an_adapter_of_another_shape(tmp_path):
    unet = lora.add_lora(models.tiny_sd(0).unet, rank=4, alpha=4)
    lora.save_lora(unet, tmp_path)
    other = lora.add_lora(models.tiny_sd(0).unet, rank=2, alpha=4)
    with pytest.raises(ValueError, match="rank 2.*rank 4"):
        lora.load_lora(other, tmp_path)


def test_load_lora_rejects_a_file_without_our_metadata(tmp_path):
    """Without the saved LoraConfig the scaling alpha / rank is unknown; diffusers' loader guesses."""
    unet = lora.add_lora(models.tiny_sd(0).unet)
    state = {f"unet.{k}": v for k, v in unet.state_dict().items() if ".lora_" in k}
    StableDiffusionPipeline.save_lora_weights(save_directory=tmp_path, unet_lora_layers=state)
    with pytest.raises(ValueError, match="load_lora_weights"):
        lora.load_lora(models.tiny_sd(0).unet, tmp_path)


def test_a_damaged_lora_is_refused_and_one_without_our_checksum_loads(tmp_path, corrupt_tensor):
    unet = lora.add_lora(models.tiny_sd(0).unet, rank=2, alpha=3)
    _simulate_training(unet)
    path = lora.save_lora(unet, tmp_path / "ours", step=7)
    assert lora.lora_step(path) == 7
    weights, header = safetensors.torch.load_file(str(path)), safetensors.safe_open(str(path), "pt").metadata()
    # another trainer's file (or an older rlr_fast's): our LoRA config, no checksum, no step
    foreign = {k: v for k, v in header.items() if not k.startswith("rlr_fast")}
    (tmp_path / "foreign").mkdir()
    safetensors.torch.save_file(weights, str(tmp_path / "foreign" / lora.LORA_WEIGHT_NAME), metadata=foreign)
    torch.testing.assert_close(_eps(lora.load_lora(models.tiny_sd(0).unet, tmp_path / "foreign")), _eps(unet),
                               atol=1e-6, rtol=0)
    corrupt_tensor(path, sorted(weights)[0])  # one flipped exponent bit
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is damaged: its weights do not match the checksum"):
        lora.load_lora(models.tiny_sd(0).unet, tmp_path / "ours")


@pytest.mark.slow
def test_equal_loras_are_equal_bytes_in_any_process(tmp_path):
    """The adapter config's target_modules is a set: its order, and so the file, used to change with
    the process's hash seed."""
    code = ("import sys; from rlr_fast import lora, models\n"
            "lora.save_lora(lora.add_lora(models.tiny_sd(0).unet, seed=0), sys.argv[1])\n")
    for hash_seed in ("1", "2"):  # seeds under which both orders differed
        subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], check=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed}, capture_output=True)
    first, second = ((tmp_path / seed / lora.LORA_WEIGHT_NAME).read_bytes() for seed in ("1", "2"))
    assert first == second


def test_save_lora_onto_a_file_path(tmp_path):
    unet = lora.add_lora(models.tiny_sd(0).unet)
    path = tmp_path / "taken"
    path.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=re.escape(str(path))):
        lora.save_lora(unet, path)


def test_save_lora_without_adapter(tmp_path):
    with pytest.raises(ValueError, match="add_lora"):
        lora.save_lora(models.tiny_sd(0).unet, tmp_path)


def test_load_lora_of_a_pickle_is_one_clear_error(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / lora.LORA_WEIGHT_NAME)
    with pytest.raises(ValueError, match=r"is not a readable safetensors file \(SafetensorError") as error:
        lora.load_lora(models.tiny_sd(0).unet, tmp_path)
    assert "\n" not in str(error.value)


def test_save_lora_replaces_the_file_and_leaves_no_temporary_folder(tmp_path):
    unet = lora.add_lora(models.tiny_sd(0).unet)
    lora.save_lora(unet, tmp_path)
    _simulate_training(unet)
    lora.save_lora(unet, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [lora.LORA_WEIGHT_NAME]
    fresh = lora.load_lora(models.tiny_sd(0).unet, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(lora.lora_parameters(unet), lora.lora_parameters(fresh)))


def test_load_lora_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / lora.LORA_WEIGHT_NAME))):
        lora.load_lora(models.tiny_sd(0).unet, tmp_path)
