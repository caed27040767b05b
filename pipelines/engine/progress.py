"""The trainer's progress line: what a person following a run reads (the per-term losses go to the JSON log
and MLflow, and to ``-v``)."""

from __future__ import annotations

import resource
import time

import torch

# the headline of a progress line; the per-term losses go to the JSON log and MLflow (and -v)
PROGRESS_KEYS = ("loss", "lr", "time_per_iter", "images_per_s", "peak_memory_mb")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(done: int, total: int, start: int, run_start: float, values: dict[str, float]) -> str:
    """``iter 120/400 (30%) | loss 1.234 | lr 2.00e-04 | eta 3m12s | 12.3 img/s | mem 812 MB``.

    The ETA extrapolates the time per iteration of this process's run (since ``run_start`` at iteration
    ``start``) over the iterations left.
    """
    elapsed = time.perf_counter() - run_start
    per_iter = elapsed / max(done - start, 1)
    return (
        f"iter {done}/{total} ({100 * done // max(total, 1)}%) | loss {values.get('loss', float('nan')):.4f} | "
        f"lr {values.get('lr', float('nan')):.2e} | eta {_duration(per_iter * (total - done))} | "
        f"{values.get('images_per_s', 0.0):.1f} img/s | mem {values.get('peak_memory_mb', 0.0):.0f} MB"
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
