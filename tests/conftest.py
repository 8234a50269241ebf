import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU is
# present. Must be set before any module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)  # reproducible float sums across runs and machines


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
