"""The memory planner: fit one update into a memory budget with the least recomputation.

    p = rlr_fast.plan("sd14", max_memory_gb=4)     # a Config, preset name, EstimatorOptions or dict
    p.options             # max_batch, checkpoint_unet, split_cfg, checkpoint_vae, decode_chunk, ...
    p.config_overrides()  # the same as Config keys: cfg.with_overrides(p.config_overrides())
    p.peak_bytes          # estimated peak tensor bytes of one update
    p.breakdown           # what is alive at the peak, by part; sums to peak_bytes
    print(p.table())

    python -m rlr_fast.plan --preset sd14 --max-memory-gb 4 --set resolution=448

Where the bytes come from: MEASUREMENT, not a hand-written model. The real architectures (SD1.4's
or SDXL's UNet or SD3.5 Medium's transformer, VAE and a CLIP-L/14 aesthetic reward, or those of the
model folder) run forward and
backward on the meta device, with no memory and no weights, through rlr_fast's own code paths:
`rollout.rollout`, `sweep.pathwise_sweep` and `sweep.likelihood_ratio` as the estimators call
them, `rewards.latent.LatentReward` as the loop calls it.

    measure.py        counting live and saved bytes on meta; GPU-like attention and autocast
    architectures.py  the networks on meta (configs from "sd14", "sdxl", "sd35m", the default model or a folder)
    phases.py         each phase of an update, measured on the code paths above
    table.py          the measurements by key, cached in rlr_fast/assets/plan_measurements.json
    search.py         the run from a Config, the candidate options and the choice
    generate.py       regenerating the cache: the runs it ships, and checks of the fits

The SD1.4 measurements at 512 px, the sdxl preset's (SDXL 1.0 base at 1024 px, with its own VAE
and with the fp16-fix VAE) and the sd35m preset's (SD3.5 Medium's transformer at 1024 px) are
cached; regenerate them (about ten minutes on a CPU) after changing a measured code path or the
dependencies: `python -m rlr_fast.plan --measure`. Anything else (another resolution, LoRA rank or
architecture) is measured when first asked for: seconds for SD1.4, minutes for SDXL or SD3.5. The
model family (rlr_fast.families) says what a network is conditioned on and which text encoders and
VAE precision come with it, so SDXL, SD3's flow transformer and the video UNets plan through the
same code.
"""

from .architectures import PixelReward, aesthetic_architecture, as_unchecked_reward
from .measure import GIB, LiveBytes, Measurement, count_flops, gpu_like_execution, measure
from .phases import measure_decode_phase, measure_reward_network, measure_reward_phase, measure_unet_phase
from .search import OPTION_NAMES, Plan, PlanError, Run, as_config, describe_run, plan, step_counts
from .generate import generate_measurements
from .table import MEASUREMENTS_FILE, MeasurementTable, default_table

__all__ = [
    "GIB", "LiveBytes", "MEASUREMENTS_FILE", "Measurement", "MeasurementTable", "OPTION_NAMES", "PixelReward", "Plan",
    "PlanError", "Run", "aesthetic_architecture", "as_config", "as_unchecked_reward", "count_flops", "default_table",
    "describe_run", "generate_measurements", "gpu_like_execution", "measure", "measure_decode_phase",
    "measure_reward_network", "measure_reward_phase", "measure_unet_phase", "plan", "step_counts",
]
