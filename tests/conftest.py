"""Shared test fixtures: paths to the real corpora and the GPU marker."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Two cores are shared by every test process; oversubscription slows multi-rank tests badly.
# Under pytest-xdist each worker already holds a core, so a worker computes on one thread.
IN_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
torch.set_num_threads(1 if IN_XDIST_WORKER else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real corpora beside the repo; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    return SHARED_DATA
