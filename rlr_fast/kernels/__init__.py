"""Triton kernels of rlr_fast: the package `rlr_fast.kernels`, its sources in the repository's top-level kernels/.

kernels/ has no __init__.py of its own: as a package it would be importable as `kernels` from the
repository root (where `python -m`, torchrun and pytest put the root on sys.path) and shadow the
`kernels` distribution that transformers imports. This file makes kernels/ the body of
rlr_fast.kernels: setup.py installs the sources here, beside this file, and in a checkout (an
editable install, or a source tree whose build failed) the package's path reaches kernels/.

Standalone by design: this package imports torch and triton only, never rlr_fast, so the kernels
can be tested, benchmarked and reused on their own. rlr_fast.ddim dispatches to them for CUDA
tensors. On a machine without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1
set before these modules are imported) on CPU tensors, which is how the tests exercise them there.

One op per module, each with its @triton.jit kernels, launchers, a torch.autograd.Function and a
functional entry point:

    rlr_fast.kernels.ddim_step.ddim_step                   fused DDIM step + log-density of its draw
    rlr_fast.kernels.gaussian_log_prob.gaussian_log_prob   Gaussian log-density and its score

(the fused step's Function is ddim_step_function.py, torch only: one Function for every backend of
that op, the compiled rlr_fast._C included), beside them utils.py (the grid, the reduction, launch
sizes, checks both ops share) and reference.py: the ops' specification in plain PyTorch (torch
only, no triton), which every backend, the compiled rlr_fast._C ops included, is tested against
and which rlr_fast.ddim uses as its "reference" backend.

The functions are not re-exported here: they share their modules' names, and re-exporting would
hide the modules behind them.
"""

import os

# A checkout: the sources are in <repo>/kernels, not beside this file (an installed rlr_fast has them here).
_CHECKOUT_SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                 "kernels")
if not os.path.exists(os.path.join(__path__[0], "reference.py")) and os.path.isdir(_CHECKOUT_SOURCES):
    __path__.append(_CHECKOUT_SOURCES)
