"""Checkpoint files are data, not code: every torch.load of a checkpoint runs with weights_only=True.

DeepSpeed reads its ZeRO files with `torch.load(..., weights_only=False)`, which runs whatever a
pickle asks for; a checkpoint copied from elsewhere (a shared disk, a download) could then run code
on every rank. Inside `checkpoint_loading()` torch.load is forced to weights_only=True with an
allow-list of the few non-tensor types DeepSpeed's and Accelerate's files hold; a file that needs
anything else is refused with one line naming the file and the type.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch


class UnsafeCheckpointFile(ValueError):
    """A checkpoint file that needs more than tensors and plain containers to load."""


def allowed_globals() -> list:
    """What ZeRO-2/3 model_states / optim_states and Accelerate's RNG files pickle besides tensors
    (found by saving 2-rank ZeRO-2 and ZeRO-3 checkpoints and reading them with weights_only=True)."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy arrays of the RNG states

    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed, so no ZeRO files to read
        return list(TORCH_SAFE_GLOBALS)
    return [*TORCH_SAFE_GLOBALS, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_GLOBAL = re.compile(r"GLOBAL (\S+)")


def _refusal(source, err: Exception) -> UnsafeCheckpointFile:
    found = _GLOBAL.search(str(err))
    what = f"needs {found.group(1)}" if found else str(err).splitlines()[0]
    name = source if isinstance(source, (str, Path)) else getattr(source, "name", "a checkpoint file")
    return UnsafeCheckpointFile(f"{name}: refused to load: it {what}, which a checkpoint file may not "
                                "contain (not written by this trainer, or tampered with)")


@contextlib.contextmanager
def checkpoint_loading() -> Iterator[None]:
    # Patching the attribute reaches DeepSpeed and Accelerate, which call `torch.load` by name and
    # pass weights_only=False explicitly.
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return original(f, *args, **kwargs)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the path
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                raise _refusal(f, err) from None
            raise

    with torch.serialization.safe_globals(allowed_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def safe_torch_load(path: str | Path, **kwargs):
    """One checkpoint file, under the same rules."""
    with checkpoint_loading():
        return torch.load(path, map_location="cpu", **kwargs)
