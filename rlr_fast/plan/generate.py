"""Regenerating the measurement cache, rlr_fast/assets/plan_measurements.json (`python -m rlr_fast.plan
--measure`): the runs whose measurements ship, planned on an empty table, then the fits checked against
direct measurements further out. It uses the planner (search.py) and the table (table.py); neither
imports it.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config import Config
from ..options import METHODS
from . import architectures as arch
from .phases import combined_reward_bytes, measure_reward_phase, measure_unet_phase
from .search import plan
from .table import MEASUREMENTS_FILE, MeasurementTable


def candidate_runs() -> Iterator[tuple[Config, str]]:
    """The runs whose measurements ship in the cache, with their built-in architecture: the sd14 preset
    at 512 px in float16 and float32, every method, with and without guidance, the aesthetic reward
    (in either precision) and a network-free one, and at 256 px in float16; the sdxl preset (1024 px,
    float16) with SDXL's own VAE and with the fp16-fix VAE; the sd35m preset (SD3.5 Medium, 1024 px)."""
    for dtype, reward_dtype, resolutions in (("float16", "float16", (None, 256)), ("float16", "float32", (None,)),
                                             ("float32", "float32", (None,))):
        for resolution, guidance, method, reward in itertools.product(resolutions, (7.5, 1.0), METHODS,
                                                                      ("aesthetic", "brightness")):
            # ddpo's and grpo's grad_accum must divide their minibatches; it changes no bytes
            accum = {"grad_accum": 1} if method in ("ddpo", "grpo") else {}
            yield Config.from_preset("sd14", dtype=dtype, guidance_scale=guidance, method=method, reward=reward,
                                     reward_kwargs={"dtype": reward_dtype}, resolution=resolution, **accum), "sd14"
    for model in ("sdxl-vae-fp16-fix", "sdxl"):
        yield Config.from_preset("sdxl"), model
    yield Config.from_preset("sd35m"), "sd35m"


def generate_measurements(path: Path = MEASUREMENTS_FILE, log: Callable[[str], None] = print) -> Path:
    """Measure what `plan()` needs for SD1.4 at 512 px (both precisions, every method, guidance on and
    off, each memory option) and for the sdxl preset, and write the JSON cache; then check the fits
    further out."""
    table = MeasurementTable(path=None)
    start = time.time()
    for cfg, model in candidate_runs():
        plan(cfg, model=model, table=table)
        log(f"{model} {cfg.dtype} {cfg.resolution or 'native'} px {cfg.method} guidance={cfg.guidance_scale} "
            f"{cfg.reward} (network in {cfg.reward_kwargs['dtype']}): {time.time() - start:.0f} s, "
            f"{len(table.data['entries'])} entries")
    table.data["fit_checks"] = fit_checks(table)
    for c in table.data["fit_checks"]:
        log(f"fit check {c['what']}: relative error {c['rel_error']:.4f}")
    log(f"measured in {time.time() - start:.0f} s")
    return table.save(path)


def fit_checks(table: MeasurementTable) -> list[dict]:
    """Direct measurements of SD1.4 phases beyond the fitted points, next to the fitted values."""
    configs = arch.component_configs("sd14")
    unet_id, vae_id = arch.architecture_id("unet", configs["unet"]), arch.architecture_id("vae", configs["vae"])
    hw, half = (64, 64), torch.float16
    checks = []

    def check(what: str, measured: int, fitted: int):
        checks.append({"what": what, "measured": measured, "fitted": fitted,
                       "rel_error": abs(fitted - measured) / measured})

    unet = table.unet(configs["unet"], half, 4)
    measured = measure_unet_phase(unet, 4, hw, cfg_mode="together", grad="params", checkpoint=False, autocast=True)
    check("unet likelihood-ratio call on 4 samples, guidance together, autocast", measured.peak_bytes,
          table.unet_phase(unet_id, configs["unet"], 4, hw, autocast=True, attention="flash", lora_rank=4,
                           cfg_mode="together", grad="params", checkpoint=False))
    vae = table.vae(configs["vae"], half)
    for batch, chunk, ckpt_reward in ((4, 2, False), (8, 1, False), (8, 1, True)):
        network = table.reward("aesthetic", half, ckpt_reward)
        measured = measure_reward_phase(vae, network, batch, hw, decode_chunk=chunk, checkpoint_vae=True, grad=True,
                                        autocast=True).peak_bytes
        decode = table.decode_phase(vae_id, configs["vae"], batch, chunk, hw, dtype=half, attention="flash",
                                    grad=True, checkpoint_vae=True)
        net = table.reward_network("aesthetic", batch, (512, 512), dtype=half, attention="flash", grad=True,
                                   checkpoint=ckpt_reward)
        check(f"decode + aesthetic reward, batch {batch}, decode_chunk {chunk}, checkpoint_vae, "
              f"checkpoint_reward={ckpt_reward}, fp16", measured, combined_reward_bytes(decode, net))
    return checks
