"""Triton kernels of rlr_fast, installed as `rlr_fast.kernels`.

Standalone by design: this package imports torch and triton only, never rlr_fast, so the kernels
can be tested, benchmarked and reused on their own. rlr_fast.ddim dispatches to them for CUDA
tensors. On a machine without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1
set before these modules are imported) on CPU tensors, which is how the tests exercise them there.

One op per module, each with its @triton.jit kernels, launchers, a torch.autograd.Function, a
functional entry point and a plain PyTorch reference of the same math:

    rlr_fast.kernels.ddim_step.ddim_step                   fused DDIM step + log-density of its draw
    rlr_fast.kernels.gaussian_log_prob.gaussian_log_prob   Gaussian log-density and its score

The functions are not re-exported here: they share their modules' names, and re-exporting would
hide the modules behind them.
"""
