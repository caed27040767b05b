"""Shared test settings. Its folder is put on ``sys.path`` by pytest, so ``reference_data`` imports."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in its interpreter, which must be chosen before triton is
    # first imported (any test module importing models or cuda_ops may import it)
    os.environ.setdefault("TRITON_INTERPRET", "1")
