"""Quiet output by default: a run prints its own lines, not every library's notices.

Silenced unless `--verbose`: FutureWarnings, PEFT's configuration warnings, transformers' and
datasets' info/warning logs and progress bars, and DeepSpeed's "Setting accelerator to CPU"
notice (on a machine without CUDA we name the CPU accelerator DeepSpeed would pick anyway).
Errors always show. Every rank of a launched run calls this from its own entry point.
"""
from __future__ import annotations

import logging
import os
import warnings


def set_verbosity(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft(\.|$)")
    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
