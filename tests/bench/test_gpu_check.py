"""``make gpu-check`` on a host without CUDA stops at once and says why."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: make gpu-check runs")
def test_gpu_check_without_cuda_fails_clearly() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 1
    assert "gpu-check needs a CUDA device" in done.stderr
    assert "EXTRAS=gpu,dev make setup" in done.stderr
