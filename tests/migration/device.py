"""The device the KV data-path tests put their caches on: CPU here, a GPU
under ``make gpu-check`` (``SHOAL_TEST_DEVICE=cuda``)."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("SHOAL_TEST_DEVICE", "cpu"))
