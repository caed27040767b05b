"""Steps a and b of the GPU suite (``benchmarks/gpu_suite.py``): the deformable-attention kernel.

a. Parity of the Triton backend with the pure-PyTorch reference (float64) on the shape grid of
   ``tests/cuda_ops/test_triton_backend.py`` (its input generator, border coordinates and
   tolerances are imported from there), output and the three gradients, every case on fresh random
   inputs, the backend's output buffers poisoned with NaN. The cases run in a pool of spawned
   processes, so the Triton compilations (one per specialisation, most of the step's time on a
   cold machine) use several CPU cores.
b. Forward, backward and forward+backward times of both backends at the model's shapes, through
   ``benchmarks/ms_deform_attn/bench_kernel.py`` (its cases, inputs, timer, memory floors and targets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import itertools
import logging
import math
import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.ms_deform_attn import bench_kernel as bk
from cuda_ops import TRITON_BACKEND, available_backends, resolve_backend
from cuda_ops.reference import ms_deform_attn_pytorch

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
GRID_MODULE = REPO_ROOT / "tests" / "cuda_ops" / "test_triton_backend.py"
OUTPUTS = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATHS = ("default", "all-atomic")  # backward value-gradient paths: the default configuration, atomics only
BORDER_SHAPES = ((4, 8), (2, 4))  # the border test's levels: non-square, powers of two
BORDER_QUERIES = 9 * 9  # every (x, y) pair of the 9 border coordinates of a level
GPU_QUERIES, GPU_BATCH_HEADS_POINTS = 300, ((1, 1, 1), (3, 8, 4))  # the test's GPU grid
DRY_SHAPES = (((6, 5), (3, 4)),)  # the interpreter: one small non-square pyramid
DRY_QUERIES, DRY_BATCH_HEADS_POINTS = 19, ((1, 1, 2),)
# step b: GPU timer settings (fewer repetitions than bench_kernel's default, to fit the step's budget)
KERNEL_WARMUP, KERNEL_REPEATS = 3, 10
DRY_WARMUP, DRY_REPEATS = 1, 1  # the interpreter takes about 0.3 s a call
KERNEL_BATCHES = (8, 2, 16)  # batch 8 first: the target's
PRIORITY_CASES = ("injector-B", "extractor-B", "pixel-decoder-896-32h")  # UperNet-B and M2F-L first


def kernel_device() -> torch.device:
    """Where steps a and b run: CUDA if there is a device (also in a dry run), else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def triton_problem(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` (None when it can)."""
    try:
        resolve_backend(torch.zeros(1, 1, 1, 1, device=device), TRITON_BACKEND)
    except RuntimeError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# Step a: parity


@dataclasses.dataclass(frozen=True)
class ParityCase:
    """One parity case; ``kind`` is ``random`` (the test's generator) or ``border`` (exact borders)."""

    index: int
    kind: str
    shapes: tuple[tuple[int, int], ...]
    dtype: str
    channels: int
    batch: int
    heads: int
    points: int
    queries: int
    path: str
    seed: int


def parity_cases(dry_run: bool, seed: int) -> list[list[ParityCase]]:
    """The grid, grouped into tasks that share their kernel specialisations, in priority order.

    GPU: the test's grid (4 level sets incl. non-square and mixed on-chip/atomic, 32 and 64 channels,
    (batch, heads, points) (1, 1, 1) and (3, 8, 4), 300 queries) plus the border case at 32 and 64
    channels, each in fp32, bf16 and fp16 and through both backward paths. Dry run: one small level set.
    """
    grid = _grid()
    if dry_run:
        levels, bhp, queries = [tuple(s) for s in DRY_SHAPES], DRY_BATCH_HEADS_POINTS, DRY_QUERIES
    else:
        # the injector-like pyramid and the mixed on-chip/atomic one first
        order = [2, 3, 1, 0]
        levels = [tuple(grid.GPU_LEVELS[i]) for i in order]
        bhp, queries = GPU_BATCH_HEADS_POINTS, GPU_QUERIES
    tasks: list[list[ParityCase]] = []
    index = 0
    for dtype in ("bfloat16", "float32", "float16"):
        for channels in (32, 64):
            groups = [("random", shapes, bhp, queries) for shapes in levels]
            groups.append(("border", BORDER_SHAPES, ((1, 1, 1),), BORDER_QUERIES))
            for kind, shapes, combos, count in groups:
                task = []
                for (batch, heads, points), path in itertools.product(combos, PATHS):
                    task.append(
                        ParityCase(
                            index=index,
                            kind=kind,
                            shapes=shapes,
                            dtype=dtype,
                            channels=channels,
                            batch=batch,
                            heads=heads,
                            points=points,
                            queries=count,
                            path=path,
                            seed=seed + index,
                        )
                    )
                    index += 1
                tasks.append(task)
    return tasks


@functools.cache
def _grid() -> Any:
    """``tests/cuda_ops/test_triton_backend.py``: shape grid, input generator, tolerances."""
    spec = importlib.util.spec_from_file_location("_gpu_suite_triton_grid", GRID_MODULE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {GRID_MODULE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _PoisonedTorch:
    """Stands for ``torch`` inside the triton backend: its output buffers start as NaN.

    ``torch.empty`` (the forward output) and ``torch.zeros_like`` (the location and weight gradients,
    each element stored by exactly one program) return NaN-filled tensors, so an element the kernels
    do not write shows as NaN. The value gradient is a zero-initialised float32 accumulator (scatter
    target) by design and is not poisoned.
    """

    def __init__(self) -> None:
        self.poisoned = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def empty(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.poisoned += 1
        return torch.empty(*args, **kwargs).fill_(math.nan)

    def zeros_like(self, tensor: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.poisoned += 1
        return torch.full_like(tensor, math.nan, **kwargs)


@contextlib.contextmanager
def _poisoned(module: Any) -> Iterator[_PoisonedTorch]:
    proxy = _PoisonedTorch()
    original = module.torch
    module.torch = proxy
    try:
        yield proxy
    finally:
        module.torch = original


def _border_inputs(case: ParityCase, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The border test's locations: every pair of exact border / pixel-centre / outside coordinates."""
    grid = _grid()
    xs = torch.tensor([grid._border_locations(w) for _, w in case.shapes], dtype=torch.float64)
    ys = torch.tensor([grid._border_locations(h) for h, _ in case.shapes], dtype=torch.float64)
    pairs = torch.stack(torch.broadcast_tensors(xs[:, :, None], ys[:, None, :]), dim=-1).flatten(1, 2)
    locations = pairs.permute(1, 0, 2)[None, :, None, :, None, :].float()  # (1, Q, 1, L, 1, 2)
    queries = locations.shape[1]
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    value = torch.randn(1, sum(h * w for h, w in case.shapes), 1, case.channels, generator=gen)
    weights = torch.rand(1, queries, 1, len(case.shapes), 1, generator=gen)
    grad_out = torch.randn(1, queries, case.channels, generator=gen)
    return (
        value.to(device, dtype),
        locations.to(device),
        weights.to(device, dtype),
        grad_out.to(device, dtype),
    )


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_parity_case(case: ParityCase, device: torch.device) -> dict[str, Any]:
    """Triton vs the float64 reference on one case: per output relative L2 and largest-element errors."""
    from cuda_ops import triton_backend as tb

    grid = _grid()
    dtype = DTYPES[case.dtype]
    if case.kind == "border":
        inputs = _border_inputs(case, device)
    else:
        inputs = grid._random_case(
            case.shapes,
            batch=case.batch,
            queries=case.queries,
            heads=case.heads,
            channels=case.channels,
            points=case.points,
            dtype=dtype,
            seed=case.seed,
            device=device,
        )
    config = None
    if case.path == "all-atomic":
        config = dataclasses.replace(tb.backward_config_default(case.channels), dense_max_positions=0)
    with _poisoned(tb) as proxy:
        ours = grid._run(
            functools.partial(tb.ms_deform_attn_triton, backward_config=config), case.shapes, inputs
        )
    reference = grid._run(ms_deform_attn_pytorch, case.shapes, inputs, cast=torch.float64)
    tolerance = grid.TOLERANCES[dtype]
    errors, passed = {}, proxy.poisoned == 3
    for name, a, ref in zip(OUTPUTS, ours, reference, strict=True):
        diff = a.double() - ref
        rel_l2 = float(diff.norm() / ref.norm().clamp_min(1e-300))
        max_rel = float(diff.abs().max() / ref.abs().max().clamp_min(1e-300))
        finite = bool(torch.isfinite(a).all())
        ok = finite and rel_l2 <= tolerance and max_rel <= grid.MAX_ERROR_FACTOR * tolerance
        errors[name] = {
            "rel_l2": _finite_or_none(rel_l2),
            "max_rel": _finite_or_none(max_rel),
            "finite": finite,
            "pass": ok,
        }
        passed = passed and ok
    dtypes_ok = ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == torch.float32
    return {
        "errors": errors,
        # over the four outputs: the largest relative L2 error, and the largest single-element error
        # relative to the largest reference element (None: not finite)
        "worst_rel_l2": _finite_or_none(max(e["rel_l2"] or math.inf for e in errors.values())),
        "max_rel_error": _finite_or_none(max(e["max_rel"] or math.inf for e in errors.values())),
        "tolerance_rel_l2": tolerance,
        "tolerance_max_rel": grid.MAX_ERROR_FACTOR * tolerance,
        "poisoned_buffers": proxy.poisoned,
        "dtypes_ok": dtypes_ok,
        "pass": passed and dtypes_ok,
    }


def run_parity_task(task: tuple[list[ParityCase], float, bool]) -> list[dict[str, Any]]:
    """Run one task's cases (in a pool worker or in process) until the wall-clock ``deadline``."""
    cases, deadline, dry_run = task
    if dry_run:
        torch.set_num_threads(1)
    device = kernel_device()
    records = []
    for case in cases:
        record: dict[str, Any] = {**dataclasses.asdict(case), "device": str(device)}
        if time.time() > deadline:
            record["status"] = "skipped: step budget spent"
            records.append(record)
            continue
        start = time.perf_counter()
        try:
            record.update(run_parity_case(case, device))
            record["status"] = "ok"
        except Exception as exc:  # a case that raises is recorded with its traceback, the grid goes on
            record.update(
                status="error", error=repr(exc), traceback=traceback.format_exc(), **{"pass": False}
            )
        record["seconds"] = time.perf_counter() - start
        records.append(record)
    return records


def step_parity(ctx: Any, record: dict[str, Any]) -> str:
    """Step a: the parity grid; returns the step's status."""
    device = kernel_device()
    problem = triton_problem(device)
    figures: dict[str, Any] = {"device": str(device), "interpreted": device.type == "cpu", "seed": ctx.seed}
    record["figures"] = figures
    if problem is not None:
        record["reason"] = problem
        return "skipped"
    tasks = parity_cases(ctx.dry_run, ctx.seed)
    total = sum(len(t) for t in tasks)
    figures.update(
        {
            "grid_source": str(GRID_MODULE.relative_to(REPO_ROOT)),
            "tolerances_rel_l2": {name: _grid().TOLERANCES[dtype] for name, dtype in DTYPES.items()},
            "max_error_factor": _grid().MAX_ERROR_FACTOR,
            "poisoning": "forward output, location and weight gradients filled with NaN before the kernels "
            "run; the value gradient is a zero-initialised accumulator by design",
            "workers": ctx.parity_workers,
            "cases": [],
        }
    )
    deadline = time.time() + ctx.time_left()
    jobs = [(task, deadline, ctx.dry_run) for task in tasks]
    cases: list[dict[str, Any]] = figures["cases"]
    for records in _map_tasks(jobs, ctx.parity_workers, ctx.time_left):
        cases.extend(records)
        _summarise_parity(figures, total)
        ctx.save()
    raised = [c for c in cases if c["status"] == "error"]
    if raised and ctx.parity_workers > 0 and not ctx.expired():
        # a worker's own trouble (its CUDA context, say) must not pass for the kernel's: once more here
        log.warning("parity: %d cases raised in the pool; running them again in this process", len(raised))
        names = [f.name for f in dataclasses.fields(ParityCase)]
        again = run_parity_task(
            ([ParityCase(**{n: c[n] for n in names}) for c in raised], deadline, ctx.dry_run)
        )
        cases[:] = [c for c in cases if c["status"] != "error"] + [
            {**c, "retried_in_process": True} for c in again
        ]
    _summarise_parity(figures, total)
    counts = figures["counts"]
    worst = figures["worst_rel_l2"]
    record["headline"] = f"{counts['passed']}/{total} pass; worst rel. L2 " + ", ".join(
        f"{k} {'n/a' if v is None else f'{v:.1e}'}" for k, v in worst.items()
    )
    if counts["failed"] or counts["errors"]:
        return "failed"
    return "ok" if counts["passed"] == total else "timeout"


def _map_tasks(
    jobs: list[tuple[list[ParityCase], float, bool]], workers: int, time_left: Callable[[], float]
) -> Iterator[list[dict[str, Any]]]:
    """Results of ``run_parity_task`` over ``jobs`` as they finish: in a spawned pool, or in process."""
    if workers <= 0:
        for job in jobs:
            yield run_parity_task(job)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        results = pool.imap_unordered(run_parity_task, jobs)
        for _ in jobs:
            try:
                yield results.next(timeout=max(1.0, time_left()))
            except multiprocessing.TimeoutError:
                log.warning("parity: the step's budget ran out with tasks unfinished; stopping the pool")
                return


def _summarise_parity(figures: dict[str, Any], total: int) -> None:
    cases = figures["cases"]
    cases.sort(key=lambda c: c["index"])
    ran = [c for c in cases if c["status"] == "ok"]
    figures["counts"] = {
        "total": total,
        "passed": sum(bool(c.get("pass")) for c in ran),
        "failed": sum(not c.get("pass") for c in ran),
        "errors": sum(c["status"] == "error" for c in cases),
        "not_run": total - len(ran) - sum(c["status"] == "error" for c in cases),
    }
    for key in ("worst_rel_l2", "max_rel_error"):
        figures[key] = {}
        for name in DTYPES:
            values = [c[key] if c[key] is not None else math.inf for c in ran if c["dtype"] == name]
            figures[key][name] = _finite_or_none(max(values)) if values else None
    figures["failed_cases"] = [c["index"] for c in cases if c["status"] == "error" or not c.get("pass", True)]


# ---------------------------------------------------------------------------------------------
# Step b: the kernel at the model's shapes


def kernel_items(dry_run: bool) -> list[tuple[bk.Case, int, torch.dtype]]:
    """(case, batch, dtype) in priority order: bf16 batch 8 of every case (the target), then the rest."""
    if dry_run:
        case = bk.Case("smoke-injector", 16, ((8, 8), (4, 4), (2, 2)), 2, 32)
        return [(case, 1, torch.bfloat16), (case, 1, torch.float32)]
    cases = bk.model_cases()
    rank = {name: i for i, name in enumerate(PRIORITY_CASES)}
    cases.sort(key=lambda c: rank.get(c.name, len(rank)))  # stable: the others keep their order
    items = [(c, b, torch.bfloat16) for b in KERNEL_BATCHES for c in cases]
    return items + [(c, bk.TARGET_BATCH, torch.float32) for c in cases]


def step_kernel(ctx: Any, record: dict[str, Any]) -> str:
    """Step b: both backends at the model's shapes, against the measured copy bandwidth's floor."""
    device = kernel_device()
    probe = torch.zeros(1, 1, 1, 1, device=device)
    backends = ["pytorch", *([TRITON_BACKEND] if TRITON_BACKEND in available_backends(probe) else [])]
    timer = bk.Timer(device, *((DRY_WARMUP, DRY_REPEATS) if ctx.dry_run else (KERNEL_WARMUP, KERNEL_REPEATS)))
    bandwidth = bk.measure_bandwidth(device, timer)
    rows: list[dict[str, Any]] = []
    figures = {
        "device": str(device),
        "interpreted": device.type == "cpu" and TRITON_BACKEND in backends,
        "backends": backends,
        "triton_unavailable": triton_problem(device),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "timing": f"median of {timer.repeats} after {timer.warmup} warm-up runs"
        + ("; CUDA events, L2 flushed before each run" if device.type == "cuda" else "; host clock"),
        "rows": rows,
        "skipped": [],
    }
    record["figures"] = figures
    ctx.save()
    for case, batch, dtype in kernel_items(ctx.dry_run):
        if ctx.expired():
            figures["skipped"].append({"case": case.name, "batch": batch, "dtype": str(dtype)})
            continue
        rows += bk.run_table([case], [batch], [dtype], backends, device, timer, bandwidth, check=False)
        figures["targets"] = bk.targets(rows)
        ctx.save()
    targets = bk.targets(rows)
    figures["targets"] = targets
    record["targets"] = {
        "speedup_fwd_bwd_min": bk.TARGET_SPEEDUP,
        "x_floor_fwd_bwd_max": bk.TARGET_FLOOR_RATIO,
        "where": "bf16, batch 8, every model case (H100 figures; the floor uses the bandwidth measured here)",
    }
    if targets:
        worst_speedup = min(t["speedup_fwd_bwd"] for t in targets)
        worst_floor = max(t["x_floor_fwd_bwd"] for t in targets)
        figures["met"] = all(t["met"] for t in targets)
        record["headline"] = (
            f"bf16 b8 fwd+bwd: >= {worst_speedup:.1f}x reference, <= {worst_floor:.2f}x floor "
            f"({len(targets)} cases, {'met' if figures['met'] else 'NOT met'})"
        )
    else:
        figures["met"] = None
        record["headline"] = "no triton bf16 batch-8 row: target not evaluated"
    return "timeout" if figures["skipped"] else "ok"
