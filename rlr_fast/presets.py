"""Named presets of a fine-tuning run (Config overrides, each value's source said beside it) and the
built-in prompt sets with their held-out evaluation sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .demo_data import PROMPTS as DEMO_PROMPTS, held_out_prompts

# Common animal names, for prompts "a photo of a <animal>" in the style of DDPO's and the RLR
# paper's aesthetic experiments (our own list).
ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow",
    "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly",
    "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "owl", "snake", "turtle", "frog",
    "chicken", "duck", "goose", "bee", "pig", "camel", "llama", "gorilla", "hedgehog", "kangaroo",
]
# Held out from ANIMALS for evaluation: common animals absent from it (our own list), same template.
HELD_OUT_ANIMALS = [
    "penguin", "elephant", "giraffe", "panda", "koala", "otter", "octopus", "crab", "parrot", "flamingo",
    "peacock", "seal", "hippopotamus", "rhinoceros", "jellyfish", "eagle",
]
PROMPT_SETS: dict[str, list[str]] = {
    "demo": list(DEMO_PROMPTS),
    "animals": [f"a photo of a {animal}" for animal in ANIMALS],
    "simple_animals": list(ANIMALS),  # bare names, as the DDPO and SQDF code's simple_animals prompts
    # demo_data.held_out_prompts: no (colour, shape) or (colour, background) pair of the demo set
    "demo_heldout": held_out_prompts(tuple(DEMO_PROMPTS)),
    "animals_heldout": [f"a photo of a {animal}" for animal in HELD_OUT_ANIMALS],
}
# The evaluation set of each built-in training set: disjoint from it (tests/test_evaluation.py checks).
HELD_OUT = {"demo": "demo_heldout", "animals": "animals_heldout"}


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded tiny model on the CPU: about a minute on 2 cores. The reward is `brightness`
    # (differentiable): the embedded model already follows its prompts' colours (color_match
    # near its maximum, so a colour demo has nothing left to raise), while brightness has headroom
    # and rises by ~10 standard errors in 60 steps (measured; docs/results.md). Like every run, a finished
    # demo is continued with --resume or replaced with --set overwrite=true, never silently.
    "demo": dict(
        model="default", device="cpu", dtype="float32", out_dir="out/demo",
        prompts="demo", reward="brightness", num_steps=10, eta=1.0, guidance_scale=1.0,
        batch_size=8, images_per_prompt=2, method="rlr", first_order_steps=1, h=2,
        baseline="loo_prompt", lora_rank=4, lora_alpha=4.0, lr=3e-3, train_steps=60, warmup_steps=5,
        max_grad_norm=1.0, sample_every=20, checkpoint_every=20, sample_prompts=4,
    ),
    # SD1.4 on one GPU, as in the RLR paper's aesthetic experiment. From the paper / its official
    # script (github.com/RTkenny/RLR-Opimtizer, scripts/aesthetic_RLR_vb.sh): SD v1.4, the LAION
    # aesthetic reward (CLIP ViT-L/14 + MLP), T = 50 DDIM steps, classifier-free guidance during
    # training, sub-chain h = 2 (chain_len=2), lr 1e-3, 3 accumulated micro-batches of 6, seed 42,
    # one first-order step, animal prompts. From the trl AlignProp/DDPO defaults that code builds on:
    # LoRA rank 4 (alpha 4) on to_q/to_k/to_v/to_out.0, guidance 7.5 with an empty negative prompt,
    # fp16 frozen weights. Our choices: eta = 1.0 (the official script samples with eta = 0.05; our
    # likelihood-ratio terms scale as 1/sigma, so small eta makes them ~20x noisier), the
    # per-prompt leave-one-out baseline (1 prompt x 2 images per micro-batch), 200 steps with 10
    # warm-up, clipping at norm 1, and a 4 GiB update: micro-batches of 2 accumulated 9 times (the
    # paper's 18 samples per step), the reward network in fp16, and the options
    # `rlr_fast.plan(..., max_memory_gb=4)` chooses (tests/test_plan.py checks they agree):
    # checkpointed UNet steps one per call, the VAE decoded one sample at a time with every
    # block checkpointed, text encoder freed. Estimated peak: 3.41 GiB of tensors.
    "sd14": dict(
        model="stable-diffusion-v1-4", device="cuda", dtype="float16", out_dir="out/sd14", seed=42,
        prompts="animals", reward="aesthetic", reward_kwargs={"dtype": "float16"}, num_steps=50, eta=1.0,
        guidance_scale=7.5, negative_prompt="", batch_size=2, images_per_prompt=2, method="rlr",
        first_order_steps=1, h=2, baseline="loo_prompt", lora_rank=4, lora_alpha=4.0, lr=1e-3, grad_accum=9,
        train_steps=200, warmup_steps=10, max_grad_norm=1.0, sample_every=25, checkpoint_every=25,
        sample_prompts=4, checkpoint_unet=True, split_cfg=False, checkpoint_vae=True, decode_chunk=1,
        free_text_encoder=True,
    ),
    # SQDF on SD1.4 as the public aesthetic script runs it (github.com/Shin-woocheol/SQDF,
    # T2I/aesthetic.sh, its first, uncommented command, and T2I/config/alignprop_config.py for what it
    # leaves at the default). Their names -> ours: sample_num_steps=50 -> num_steps, sample_eta=1.0 ->
    # eta, sample_guidance_scale=5.0 -> guidance_scale, sqdf_gamma=0.9, sqdf_alpha=2.0 -> sqdf_alpha =
    # 2.0 x 2 / D = 2.44140625e-4 (their KL is the per-element mean, ours the sum over D = 4 x 64 x 64
    # latent elements; docs/estimator.md §11.3), sqdf_step_min=0 / sqdf_step_max=50 -> sqdf_steps
    # (all steps), reward_fn='aesthetic', prompt_fn='simple_animals' (our list of bare animal names),
    # train_batch_size=4 -> batch_size, use_buffer=True / buffer_size=1024 / replay_ratio=1 /
    # buffer_method='random' -> replay_capacity / replay_ratio / replay_sampling='uniform',
    # train_learning_rate=1e-3 -> lr, Adam betas (0.9, 0.999), weight decay 1e-4, eps 1e-8,
    # train_max_grad_norm=1.0, lora_rank=4, mixed_precision='fp16', num_epochs=2000 -> train_steps
    # (one optimizer step each with replay_ratio 1), seed=0, the empty negative prompt.
    # Differences, because we run one GPU and ship no consistency model: their
    # train_gradient_accumulation_steps=8 on 2 GPUs is 64 samples per optimizer step and 64 fresh
    # chains per buffer refresh, here grad_accum=16 on one; their x0_hat comes from LCM-LoRA
    # (use_consistency_model=True), ours from the base model's Tweedie estimate unless
    # x0_estimator=consistency (one key: consistency_model, the LCM-LoRA folder, defaults to
    # lcm-lora-sdv1-5, loaded as a second adapter on the same UNet); their model is SD1.5 (runwayml),
    # ours SD1.4; their prompts are drawn independently,
    # ours 2 images per prompt so that the diversity metric has pairs; their LoRA starts from a gaussian
    # B (peft's init_lora_weights="gaussian"), ours from B = 0 (the base model). Memory options: those
    # `rlr_fast.plan(..., max_memory_gb=4)` chooses, as for sd14 (split_cfg too at this batch of 4):
    # estimated peak 3.44 GiB of tensors (docs/estimator.md §11.2).
    "sqdf": dict(
        model="stable-diffusion-v1-4", device="cuda", dtype="float16", out_dir="out/sqdf", seed=0,
        prompts="simple_animals", reward="aesthetic", reward_kwargs={"dtype": "float16"}, num_steps=50, eta=1.0, guidance_scale=5.0,
        negative_prompt="", batch_size=4, images_per_prompt=2, grad_accum=16, method="sqdf",
        sqdf_alpha=2.0 * 2 / (4 * 64 * 64), sqdf_gamma=0.9, sqdf_steps=None, x0_estimator="tweedie",
        replay_capacity=1024, replay_ratio=1, replay_sampling="uniform",
        lora_rank=4, lora_alpha=4.0, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, adam_eps=1e-8,
        max_grad_norm=1.0, warmup_steps=0, train_steps=2000, sample_every=50, checkpoint_every=50,
        sample_prompts=4, checkpoint_unet=True, split_cfg=True, checkpoint_vae=True, decode_chunk=1,
        free_text_encoder=True,
    ),
    # SDXL 1.0 base on one GPU. From diffusers' StableDiffusionXLPipeline defaults: 1024 px (SDXL's
    # native size), guidance 5.0, T = 50, and the empty negative prompt as zero embeddings
    # (force_zeros_for_empty_prompt; rlr_fast/sdxl.py). From the sd14 preset, itself the RLR paper's
    # recipe: rlr with f = 1, h = 2, the per-prompt leave-one-out baseline, LoRA rank 4 on the
    # attention projections, lr 1e-3, micro-batches of 2 accumulated 9 times, the aesthetic reward in
    # fp16. Memory: the options `rlr_fast.plan("sdxl", max_memory_gb=10)` chooses (tests/test_plan.py
    # checks they agree): checkpointed UNet steps one per call, the VAE decoded one sample at a time with
    # every block checkpointed, the text encoders freed; ESTIMATED peak 9.90 GiB of tensors (meta-device
    # estimate, docs/memory.md §7, not measured on a GPU). That needs the fp16-fix VAE
    # (madebyollin/sdxl-vae-fp16-fix) in the folder's vae/, hence the folder name: SDXL's own VAE
    # overflows in fp16 and is loaded in float32, and its 1024 px decoder backward alone is then 8.5 GiB
    # (estimated smallest peak 14.29 GiB whatever the options).
    "sdxl": dict(
        model="stable-diffusion-xl-base-1.0-vae-fp16-fix", device="cuda", dtype="float16", out_dir="out/sdxl",
        seed=42, prompts="animals", reward="aesthetic", reward_kwargs={"dtype": "float16"}, resolution=1024,
        num_steps=50, eta=1.0, guidance_scale=5.0, negative_prompt="", batch_size=2, images_per_prompt=2, method="rlr",
        first_order_steps=1, h=2, baseline="loo_prompt", lora_rank=4, lora_alpha=4.0, lr=1e-3, grad_accum=9,
        train_steps=200, warmup_steps=10, max_grad_norm=1.0, sample_every=25, checkpoint_every=25,
        sample_prompts=4, checkpoint_unet=True, split_cfg=False, checkpoint_vae=True, decode_chunk=1,
        free_text_encoder=True,
    ),
    # Stable Diffusion 3.5 Medium on one 16 GB card (issue 25 §4). From diffusers' StableDiffusion3Pipeline
    # defaults for it: 1024 px, guidance 4.5 (the model card's), T = 40; the flow SDE at Flow-GRPO's
    # noise level a = 0.7 (eta; rlr_fast.samplers.FlowSampler); bfloat16 weights (SD3's released
    # precision). From the sd14 preset, itself the RLR paper's recipe: rlr with f = 1, h = 2, the per-prompt
    # leave-one-out baseline, LoRA rank 4 on the attention projections, lr 1e-3, micro-batches of 2
    # accumulated 9 times, the aesthetic reward in fp16. The KL reference, where a method has one, is the
    # adapter switched off: no second copy of the transformer. Memory: the options
    # `rlr_fast.plan("sd35m", max_memory_gb=12)` chooses (tests/test_plan.py checks they agree):
    # checkpointed transformer steps two per likelihood-ratio call (max_batch 4), the VAE decoded one sample
    # at a time with every block checkpointed, the text encoders (T5's 8.9 GiB) freed; ESTIMATED peak
    # 11.16 GiB of tensors (meta-device estimate, docs/memory.md §9, not measured on a GPU).
    "sd35m": dict(
        model="stable-diffusion-3.5-medium", device="cuda", dtype="bfloat16", out_dir="out/sd35m", seed=42,
        prompts="animals", reward="aesthetic", reward_kwargs={"dtype": "float16"}, resolution=1024, num_steps=40,
        eta=0.7, guidance_scale=4.5, negative_prompt="", batch_size=2, images_per_prompt=2, method="rlr",
        first_order_steps=1, h=2, baseline="loo_prompt", lora_rank=4, lora_alpha=4.0, lr=1e-3, grad_accum=9,
        train_steps=200, warmup_steps=10, max_grad_norm=1.0, sample_every=25, checkpoint_every=25,
        sample_prompts=4, max_batch=4, checkpoint_unet=True, split_cfg=False, checkpoint_vae=True, decode_chunk=1,
        free_text_encoder=True,
    ),
}


def load_prompts(spec: str) -> list[str]:
    """The prompts of a built-in set name or of a text file (one per line, '#' comments)."""
    if spec in PROMPT_SETS:
        return list(PROMPT_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompts={spec!r} is neither a built-in prompt set ({', '.join(PROMPT_SETS)}) "
                                "nor an existing file")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (only blank lines or comments)")
    return prompts


def eval_prompts_of(spec: str) -> tuple[str, bool]:
    """The prompts to evaluate a run trained on `spec` with, and whether they are held out from it: a
    built-in set's held-out set, else `spec` itself (a file, or a set without a held-out one)."""
    return (HELD_OUT[spec], True) if spec in HELD_OUT else (spec, False)
