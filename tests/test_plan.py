"""The memory planner: its measuring method against real tensors, and its plans for SD1.4."""

import importlib
import math

import pytest
import torch

from rlr_fast.models import add_lora
from rlr_fast.testing import make_unet

# `rlr_fast.plan` is the function (rlr_fast/__init__.py binds it over the submodule's name)
P = importlib.import_module("rlr_fast.plan")

GIB = 2**30
# The case: SD1.4 RLR update at 512 px, T = 50, CFG, batch 2, LoRA rank 4, h = 4, fp16.
SD14_CASE = dict(model="sd14", resolution=512, batch_size=2, num_steps=50, guidance_scale=7.5, method="rlr",
                 first_order_steps=1, h=4, lora_rank=4, precision="half", reward="aesthetic")


# ----------------------------------------------------------------------------------------------
# The measuring method


def _tiny_unet(device: str) -> torch.nn.Module:
    """conftest's tiny UNet with LoRA, on the CPU (real weights) or on meta (no weights)."""
    unet = make_unet() if device == "cpu" else P.meta_unet(make_unet().config, dtype=torch.float32, lora_rank=None)
    add_lora(unet, rank=4, alpha=4, seed=0 if device == "cpu" else None)
    for p in unet.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    return unet


def _unet_step(unet, device: str, batch: int = 2, checkpoint: bool = False):
    """(run, existing): one UNet forward + backward with an input gradient, on `device`."""
    g = torch.Generator().manual_seed(0)
    make = (lambda *s: torch.randn(*s, generator=g)) if device == "cpu" else \
        (lambda *s: torch.empty(*s, device="meta"))
    x = make(batch, 4, 8, 8).requires_grad_(True)
    cond = make(batch, 5, 16)
    t = torch.full((batch,), 500, dtype=torch.int64, device=x.device)
    cot = make(batch, 4, 8, 8)
    if checkpoint:
        unet.enable_gradient_checkpointing()

    def run():
        unet(x, t, encoder_hidden_states=cond).sample.backward(cot)

    existing = list(unet.parameters()) + list(unet.buffers()) + [p.grad for p in unet.parameters()
                                                                 if p.grad is not None] + [x, cond, t, cot]
    return run, existing


def _real_saved_bytes(run, existing) -> int:
    """Bytes saved for backward, counted on real CPU tensors by data pointer (independent of plan.py)."""
    excluded = {t.untyped_storage().data_ptr() for t in existing}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def test_meta_measurement_equals_real_cpu_tensors():
    """A tiny UNet with LoRA (the SD1.4 block types): bytes saved for backward measured on meta
    equal those of the same step on real CPU tensors, counted independently by data pointer
    (CPU SDPA runs the flash kernel the planner routes meta attention to). The live peak, from
    the same tracker on both devices, agrees closely."""
    meta_unet = _tiny_unet("meta")
    run, existing = _unet_step(meta_unet, "meta")
    meta = P.measure(run, existing=existing, precision="float32", attention="flash")

    cpu_unet = _tiny_unet("cpu")
    run, existing = _unet_step(cpu_unet, "cpu")
    real_saved = _real_saved_bytes(run, existing)
    run, existing = _unet_step(cpu_unet, "cpu")
    real = P.measure(run, existing=existing, precision="float32", attention="flash")

    assert real_saved > 100_000
    assert meta.saved_bytes == real_saved
    assert real.saved_bytes == real_saved
    assert meta.peak_bytes >= meta.saved_bytes
    assert math.isclose(meta.peak_bytes, real.peak_bytes, rel_tol=0.05)


def test_flash_routing_drops_the_stored_softmax_and_checkpointing_shrinks_the_step():
    unet = _tiny_unet("meta")

    def measured(checkpoint=False, **kw):
        run, existing = _unet_step(unet, "meta", checkpoint=checkpoint)
        return P.measure(run, existing=existing, precision="float32", **kw)

    flash, math_path = measured(attention="flash"), measured(attention="math")
    # MATH attention also saves each attention's (batch, heads, queries, keys) softmax
    assert math_path.saved_bytes > flash.saved_bytes
    assert measured(checkpoint=True).peak_bytes < flash.peak_bytes


def test_autocast_emulation_casts_like_cuda_autocast():
    x = torch.empty(2, 8, device="meta", dtype=torch.float32)
    w16 = torch.empty(8, 8, device="meta", dtype=torch.float16)
    original = torch.nn.functional.linear
    with P.gpu_like_execution(precision="autocast"):
        assert torch.nn.functional.linear(x, w16).dtype == torch.float16
        assert torch.nn.functional.group_norm(x.half().reshape(2, 8, 1), 2).dtype == torch.float32
    assert torch.nn.functional.linear is original  # the functions are restored on exit


# ----------------------------------------------------------------------------------------------
# Plans for SD1.4 (from the cached measurements: fast)


def test_sd14_rlr_case_fits_6_gib_and_no_limit_is_larger():
    limited = P.plan(SD14_CASE, max_memory_gb=6)
    assert limited.peak_bytes <= 6 * GIB
    assert limited.fits
    unlimited = P.plan(SD14_CASE)
    assert unlimited.peak_bytes > limited.peak_bytes
    # the unlimited plan is the fastest: nothing recomputed, every likelihood-ratio step in one call
    assert unlimited.extra_flops == 0
    assert unlimited.options["max_batch"] == 2 * (50 - 1 - 4)
    assert limited.extra_flops >= unlimited.extra_flops


def test_breakdown_sums_to_the_peak():
    for kwargs in (dict(), dict(max_memory_gb=6), dict(method="full_bp"), dict(guidance_scale=1.0),
                   dict(method="ddpo"), dict(precision="autocast")):
        case = dict(SD14_CASE, **{k: v for k, v in kwargs.items() if k != "max_memory_gb"})
        p = P.plan(case, max_memory_gb=kwargs.get("max_memory_gb"))
        assert sum(p.breakdown.values()) == p.peak_bytes
        assert p.breakdown[p.peak_phase] == p.phases[p.peak_phase] == max(p.phases.values())
        assert set(p.breakdown) >= {"parameters", "optimizer_state", "trajectory"}


def test_smaller_budget_fits_or_names_the_smallest_peak():
    smallest = None
    for gib in (5, 4.5, 4, 3.5, 3, 2.5, 2, 1):
        try:
            p = P.plan(SD14_CASE, max_memory_gb=gib)
        except P.PlanError as e:
            smallest = e.smallest
            assert f"{smallest.peak_gib:.2f} GiB" in str(e)
            assert smallest.peak_bytes > gib * GIB
            break
        assert p.peak_bytes <= gib * GIB
    assert smallest is not None, "even 1 GiB fitted: the estimates cannot be right"
    # nothing fits below the smallest achievable peak, and it is reached when the budget allows it
    assert P.plan(SD14_CASE, max_memory_gb=smallest.peak_bytes / GIB + 1e-6).peak_bytes <= smallest.peak_bytes


def test_peak_grows_with_the_batch():
    previous_min = previous_fast = 0
    for batch in (1, 2, 4, 8):
        case = dict(SD14_CASE, batch_size=batch)
        with pytest.raises(P.PlanError) as e:
            P.plan(case, max_memory_gb=0.5)
        fastest = P.plan(case)
        assert e.value.smallest.peak_bytes > previous_min
        assert fastest.peak_bytes > previous_fast
        previous_min, previous_fast = e.value.smallest.peak_bytes, fastest.peak_bytes


def test_options_map_onto_estimate_and_config():
    p = P.plan(SD14_CASE, max_memory_gb=6)
    assert set(p.options) == set(P.OPTION_NAMES)
    assert p.estimate_kwargs() == {"max_batch": p.options["max_batch"], "checkpoint_unet": p.options["checkpoint_unet"],
                                   "split_cfg": p.options["split_cfg"]}
    assert "| max_batch |" in p.table()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="'batch' .*did you mean 'batch_size'"):
        P.plan({"batch": 2})
    with pytest.raises(ValueError, match="max_memory_gb must be > 0"):
        P.plan(SD14_CASE, max_memory_gb=0)
    with pytest.raises(ValueError, match="rewards"):
        P.plan(dict(SD14_CASE, reward="pickscore"))
    with pytest.raises(ValueError, match="exceeds num_steps"):
        P.plan(dict(SD14_CASE, num_steps=4))


def test_measurements_are_taken_on_demand_and_cached(tmp_path):
    """A model the cache does not know is measured when first planned (here conftest's tiny UNet,
    its config as train.py passes it), and the table written by save() gives the same plan back."""
    config = dict(make_unet().config)
    case = dict(model=config, resolution=64, batch_size=2, num_steps=6, guidance_scale=1.0, h=2,
                precision="float32", reward="pixels")
    table = P.MeasurementTable(path=None)
    first = P.plan(case, table=table)
    assert any(key.startswith("unet|config:") for key in table.data["entries"])
    saved = table.save(tmp_path / "measurements.json")
    again = P.plan(case, table=P.MeasurementTable(saved))
    assert (again.peak_bytes, again.options) == (first.peak_bytes, first.options)
    assert first.phases["unet_step"] > 0 and first.phases["lr_chunk"] > first.phases["unet_step"] / 2
