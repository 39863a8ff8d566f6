import os
import sys
from pathlib import Path

# the tests import the packages from the checkout whether or not it is pip-installed
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda() -> bool:
    import torch  # does not import triton

    return torch.cuda.is_available()


# Without a GPU (CI), the Triton kernels run through Triton's interpreter against their plain-PyTorch twins
# (tests/test_kernels.py, tests/test_parallel_attention.py). triton.language reads TRITON_INTERPRET when it is first
# imported, so it is set here, before any test imports triton; with a GPU the real kernels run instead.
if "triton" not in sys.modules and not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
