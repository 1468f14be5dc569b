"""Shared fixtures: one small random supernet checkpoint per test session."""

from __future__ import annotations

import os

# Before numpy/torch load their BLAS: one thread each (see below).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
from router.local_ray import local_ray_environment  # noqa: E402

local_ray_environment()  # before any test starts a Ray

import pytest  # noqa: E402
import torch  # noqa: E402
# One intra-op thread: tiny tensors gain nothing from more, and oversubscribed
# OpenMP threads spin (a 100x slowdown when another process holds a core).
torch.set_num_threads(1)
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (tests/unit/model/test_triton_kernels.py).
# Read when a kernel is defined, so set before any test imports workers.model.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """6 layers, window 16: short prompts plus a few dozen tokens cross the window."""
    from workers.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_layers=6, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from workers.model.loader import load_checkpoint

    return load_checkpoint(tiny_checkpoint, kernels="torch")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from workers.model.tokenizer import Tokenizer

    return Tokenizer.load(tiny_checkpoint)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
