"""Shared test settings. Its folder is put on ``sys.path`` by pytest, so ``reference_data`` imports."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in its interpreter, which must be chosen before triton is
    # first imported (any test module importing models or cuda_ops may import it)
    os.environ.setdefault("TRITON_INTERPRET", "1")


REPOSITORY = Path(__file__).resolve().parents[1]
# what a command run from the repository root writes when a test forgets --no-tracking or a temporary folder
STRAY_OUTPUTS = ("mlflow.db", "mlruns", "mlartifacts")


@pytest.fixture(scope="session", autouse=True)
def _no_stray_outputs_in_the_repository():
    """Fail the session when a test wrote an MLflow store into the repository root (the user's own store)."""
    before = {name for name in STRAY_OUTPUTS if (REPOSITORY / name).exists()}
    yield
    after = {name for name in STRAY_OUTPUTS if (REPOSITORY / name).exists()}
    assert after <= before, f"tests wrote {sorted(after - before)} into {REPOSITORY}"
