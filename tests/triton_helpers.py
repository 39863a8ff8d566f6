"""Skip markers for the Triton kernels' tests: they run through Triton's interpreter on a CPU (TRITON_INTERPRET=1,
set by tests/conftest.py where there is no GPU) and as real kernels on a GPU."""
from __future__ import annotations

import os

import pytest


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - whatever makes triton unusable here is the skip reason
        return f"{type(e).__name__}: {e}"
    return None


TRITON_ERROR = _triton_import_error()
interpret = pytest.mark.skipif(
    TRITON_ERROR is not None or os.environ.get("TRITON_INTERPRET") != "1",
    reason=f"triton cannot import here ({TRITON_ERROR})" if TRITON_ERROR else
    "TRITON_INTERPRET is not 1 (a GPU is present: the GPU tests run the real kernels)")
