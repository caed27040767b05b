"""Benchmark multi-scale deformable attention: reference vs triton, forward and backward.

Shapes are the model's (issue 7, item 3a): the ViT-Adapter injector (1024 queries of a 512 crop
on 3 levels 64x64/32x32/16x16) and extractor (5376 queries on one 32x32 level) for the S, B and L
adapters (6 heads of 64 channels, 12 and 16 heads of 32), and one Mask2Former pixel-decoder layer
(every token of the 1/8-1/32 maps as a query: 640 crop with 8 heads, 896 crop with 32 heads);
batch 2, 8, 16; float32 and bfloat16 values (float32 locations).

Each time is set against its memory-traffic floor: the bytes that must move (every input read
once, every output written once) over the bandwidth of a large device-to-device copy measured at
the start of the run. Times are medians over repetitions timed with CUDA events, the L2 cache
flushed before each repetition.

Usage:
    python benchmarks/ms_deform_attn/bench_kernel.py                  # CUDA: the full table
    python benchmarks/ms_deform_attn/bench_kernel.py --sweep          # plus launch-parameter sweep
    python benchmarks/ms_deform_attn/bench_kernel.py --cpu-smoke      # tiny case, reference on CPU
Results go to ``results_<device>.json`` beside this file (``--out`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cuda_ops import TRITON_BACKEND, available_backends, ms_deform_attn

HERE = Path(__file__).resolve().parent
POINTS = 4
# the adapters' deformable attention: heads x channels per head (value dim = deform_ratio * width)
ADAPTERS = {"S": (6, 64), "B": (12, 32), "L": (16, 32)}
INJECTOR_LEVELS = [(64, 64), (32, 32), (16, 16)]  # 1/8, 1/16, 1/32 of a 512 crop
EXTRACTOR_QUERIES = 64 * 64 + 32 * 32 + 16 * 16  # all adapter tokens of a 512 crop
TARGET_SPEEDUP = 15.0  # issue 7: fwd+bwd at least 15x the reference, bf16, batch 8
TARGET_FLOOR_RATIO = 3.0  # issue 7: and within 3x of the memory floor
TARGET_BATCH = 8
COPY_BYTES = 1 << 30  # bandwidth probe: a 1 GiB device-to-device copy
FLUSH_BYTES = 256 << 20  # larger than the H100's 50 MB L2
WARMUP, REPEATS = 5, 25
SMOKE_WARMUP, SMOKE_REPEATS = 1, 5  # the interpreter takes about 0.1 s a call
PARITY_BATCH = 2


@dataclasses.dataclass(frozen=True)
class Case:
    """One deformable-attention call of the model."""

    name: str
    queries: int
    levels: tuple[tuple[int, int], ...]
    heads: int
    channels: int
    points: int = POINTS


def model_cases() -> list[Case]:
    cases = []
    for adapter, (heads, channels) in ADAPTERS.items():
        cases.append(Case(f"injector-{adapter}", 32 * 32, tuple(INJECTOR_LEVELS), heads, channels))
        cases.append(Case(f"extractor-{adapter}", EXTRACTOR_QUERIES, ((32, 32),), heads, channels))
    for crop, heads in ((640, 8), (896, 32)):
        levels = tuple((crop // s, crop // s) for s in (32, 16, 8))  # coarse first, as the decoder
        cases.append(Case(f"pixel-decoder-{crop}-{heads}h", sum(h * w for h, w in levels), levels, heads, 32))
    return cases


def make_inputs(case: Case, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Value, locations (around each query's reference point, as the model), weights, grad_out."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    length = sum(h * w for h, w in case.levels)
    value = torch.randn(batch, length, case.heads, case.channels, generator=gen).to(device, dtype)
    # reference points of the queries on a square grid, offsets of a few pixels of each level
    side = int(case.queries**0.5) + 1
    grid = (torch.arange(case.queries, dtype=torch.float32) + 0.5) / case.queries
    ref = torch.stack([(grid * side) % 1.0, grid], dim=-1)  # (Q, 2) spread over [0, 1]^2
    sizes = torch.tensor([(w, h) for h, w in case.levels], dtype=torch.float32)  # (L, 2) as (x, y)
    shape = (batch, case.queries, case.heads, len(case.levels), case.points, 2)
    offsets = torch.randn(shape, generator=gen) * 2.0 / sizes[:, None, :]
    locations = (ref[None, :, None, None, None, :] + offsets).to(device)
    logits = torch.randn(shape[:-1], generator=gen)
    weights = logits.flatten(-2).softmax(-1).view(shape[:-1]).to(device, dtype)
    grad_out = torch.randn(batch, case.queries, case.heads * case.channels, generator=gen).to(device, dtype)
    return value, locations, weights, grad_out


def floor_bytes(case: Case, batch: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes that must move: each input read once, each output written once."""
    e = torch.finfo(dtype).bits // 8
    value = batch * sum(h * w for h, w in case.levels) * case.heads * case.channels * e
    samples = batch * case.queries * case.heads * len(case.levels) * case.points
    locations, weights = samples * 2 * 4, samples * e
    out = batch * case.queries * case.heads * case.channels * e
    forward = value + locations + weights + out
    backward = (value + locations + weights + out) + (value + locations + weights)  # grad_out in, 3 grads out
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}


class Timer:
    """Median time of a callable: CUDA events with the L2 flushed before each run, or a host clock."""

    def __init__(self, device: torch.device, warmup: int = WARMUP, repeats: int = REPEATS) -> None:
        self.device = device
        self.warmup, self.repeats = warmup, repeats
        self.flush = (
            torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None
        )

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def measure_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes per second of a large copy (read + write)."""
    nbytes = COPY_BYTES if device.type == "cuda" else COPY_BYTES // 16
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


def time_backend(backend: str, case: Case, inputs, timer: Timer) -> dict[str, float]:
    value, locations, weights, grad_out = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]

    def forward() -> torch.Tensor:
        return ms_deform_attn(leaves[0], case.levels, leaves[1], leaves[2], backend=backend)

    def forward_backward() -> None:
        torch.autograd.grad(forward(), leaves, grad_out)

    def backward(out: torch.Tensor) -> None:
        torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

    with torch.no_grad():
        t_fwd = timer(forward)
    t_bwd = timer(functools.partial(backward, forward()))
    return {"forward": t_fwd, "backward": t_bwd, "forward+backward": timer(forward_backward)}


def parity(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Relative L2 errors of the triton output and gradients against the float64 reference."""
    inputs = make_inputs(case, PARITY_BATCH, dtype, device, seed=1)
    results = []
    for backend, cast in ((TRITON_BACKEND, None), ("pytorch", torch.float64)):
        leaves = [(t.to(cast) if cast else t).detach().requires_grad_(True) for t in inputs[:3]]
        out = ms_deform_attn(leaves[0], case.levels, leaves[1], leaves[2], backend=backend)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, inputs[3].to(out.dtype))])
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    return {n: ((a.double() - r).norm() / r.norm()).item() for n, a, r in zip(names, *results, strict=True)}


def run_table(cases, batches, dtypes, backends, device, timer, bandwidth, check: bool) -> list[dict]:
    rows = []
    for case in cases:
        for dtype in dtypes:
            errors = parity(case, dtype, device) if check and TRITON_BACKEND in backends else None
            for batch in batches:
                inputs = make_inputs(case, batch, dtype, device)
                floors = floor_bytes(case, batch, dtype)
                for backend in backends:
                    row = {
                        **dataclasses.asdict(case),
                        "batch": batch,
                        "dtype": str(dtype),
                        "backend": backend,
                    }
                    try:
                        times = time_backend(backend, case, inputs, timer)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        row["error"] = "out of memory"
                        rows.append(row)
                        print(f"{case.name:24} b{batch:<3} {dtype!s:15} {backend:8} out of memory")
                        continue
                    for phase, seconds in times.items():
                        floor = floors[phase] / bandwidth
                        row[phase] = {
                            "ms": seconds * 1e3,
                            "floor_ms": floor * 1e3,
                            "x_floor": seconds / floor,
                        }
                    if backend == TRITON_BACKEND and errors is not None:
                        row["parity_rel_l2"] = errors
                    rows.append(row)
                    fb = row["forward+backward"]
                    print(
                        f"{case.name:24} b{batch:<3} {dtype!s:15} {backend:8} fwd {row['forward']['ms']:9.3f} ms  "
                        f"bwd {row['backward']['ms']:9.3f} ms  fwd+bwd {fb['ms']:9.3f} ms "
                        f"({fb['x_floor']:6.1f}x floor {fb['floor_ms']:.3f} ms)"
                    )
                del inputs
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    reference = {_key(r): r for r in rows if r["backend"] == "pytorch" and "error" not in r}
    for row in rows:
        ref = reference.get(_key(row))
        if row["backend"] != "pytorch" and "error" not in row and ref is not None:
            row["speedup_vs_pytorch"] = {
                p: ref[p]["ms"] / row[p]["ms"] for p in ("forward", "backward", "forward+backward")
            }


def _key(row: dict) -> tuple:
    return (row["name"], row["batch"], row["dtype"])


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, for bf16 at batch 8, one entry per model case."""
    out = []
    for row in rows:
        if (
            row["backend"] != TRITON_BACKEND
            or row["batch"] != TARGET_BATCH
            or row["dtype"] != str(torch.bfloat16)
        ):
            continue
        if "error" in row or "speedup_vs_pytorch" not in row:
            continue
        speedup = row["speedup_vs_pytorch"]["forward+backward"]
        ratio = row["forward+backward"]["x_floor"]
        out.append(
            {
                "case": row["name"],
                "speedup_fwd_bwd": speedup,
                "speedup_target": TARGET_SPEEDUP,
                "x_floor_fwd_bwd": ratio,
                "x_floor_target": TARGET_FLOOR_RATIO,
                "met": speedup >= TARGET_SPEEDUP and ratio <= TARGET_FLOOR_RATIO,
            }
        )
    return out


def sweep(device: torch.device, timer: Timer) -> list[dict]:
    """Launch parameters of the triton kernels on the B adapter's injector and extractor (bf16, batch 8)."""
    from cuda_ops import triton_backend as tb

    rows = []
    for case in [c for c in model_cases() if c.name in ("injector-B", "extractor-B")]:
        value, locations, weights, grad_out = make_inputs(case, TARGET_BATCH, torch.bfloat16, device)
        for block_q in (16, 32, 64):
            for warps in (2, 4, 8):
                for dense_max in (0, 256, 1024):
                    config = tb.TritonConfig(block_q=block_q, num_warps=warps, dense_max_positions=dense_max)
                    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
                    out = tb.ms_deform_attn_triton(
                        leaves[0],
                        case.levels,
                        leaves[1],
                        leaves[2],
                        forward_config=config,
                        backward_config=config,
                    )
                    t_fwd = timer(
                        lambda c=config, lv=leaves, k=case: tb.ms_deform_attn_triton(
                            lv[0].detach(), k.levels, lv[1].detach(), lv[2].detach(), forward_config=c
                        )
                    )
                    t_bwd = timer(
                        lambda o=out, lv=leaves, g=grad_out: torch.autograd.grad(o, lv, g, retain_graph=True)
                    )
                    rows.append(
                        {
                            "case": case.name,
                            **dataclasses.asdict(config),
                            "forward_ms": t_fwd * 1e3,
                            "backward_ms": t_bwd * 1e3,
                        }
                    )
                    print(
                        f"sweep {case.name:12} {config}  fwd {t_fwd * 1e3:8.3f} ms  bwd {t_bwd * 1e3:8.3f} ms"
                    )
    return rows


def metadata(device: torch.device, bandwidth: float, mode: str, timer: Timer) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=False)
        except OSError:  # no git on this machine
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain")),
        "bandwidth_GBps": bandwidth / 1e9,
        "timing": f"median of {timer.repeats} after {timer.warmup} warm-up runs; "
        + ("CUDA events, L2 flushed before each run" if device.type == "cuda" else "host clock"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny case on CPU (reference; triton if interpreted)"
    )
    parser.add_argument("--cases", nargs="+", help="subset of case names (default: all)")
    parser.add_argument("--batches", nargs="+", type=int, default=[2, 8, 16])
    parser.add_argument(
        "--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32", "bfloat16"]
    )
    parser.add_argument("--no-check", action="store_true", help="skip the parity check of each case")
    parser.add_argument("--sweep", action="store_true", help="also sweep the triton launch parameters")
    parser.add_argument("--out", type=Path, help="results JSON (default: results_<device>.json here)")
    args = parser.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        cases = [Case("smoke-injector", 16, ((8, 8), (4, 4), (2, 2)), 2, 32)]
        batches = [1]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke")
        device = torch.device("cuda")
        cases = model_cases()
        batches = args.batches
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]
    dtypes = [getattr(torch, d) for d in args.dtypes]
    probe = torch.zeros(1, 1, 1, 1, device=device)
    backends = ["pytorch", *([TRITON_BACKEND] if TRITON_BACKEND in available_backends(probe) else [])]
    if device.type == "cuda" and TRITON_BACKEND not in backends:
        parser.error(
            f"the triton backend is unavailable here: {available_backends(probe)} (pip install '.[fast]')"
        )
    timer = Timer(device, *((SMOKE_WARMUP, SMOKE_REPEATS) if args.cpu_smoke else (WARMUP, REPEATS)))
    bandwidth = measure_bandwidth(device, timer)
    print(f"device {device}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; backends {backends}")
    mode = (
        "cpu-smoke (triton, if listed, ran in the interpreter: its times mean nothing)"
        if args.cpu_smoke
        else "cuda"
    )
    rows = run_table(cases, batches, dtypes, backends, device, timer, bandwidth, check=not args.no_check)
    results = {"meta": metadata(device, bandwidth, mode, timer), "rows": rows, "targets": targets(rows)}
    if args.sweep:
        results["sweep"] = sweep(device, timer)
    for target in results["targets"]:
        print(
            f"target {target['case']:24} speedup {target['speedup_fwd_bwd']:6.1f}x (>= {TARGET_SPEEDUP:g})  "
            f"{target['x_floor_fwd_bwd']:5.2f}x floor (<= {TARGET_FLOOR_RATIO:g})  {'met' if target['met'] else 'NOT met'}"
        )
    name = "cpu_smoke" if args.cpu_smoke else torch.cuda.get_device_name(device).replace(" ", "_").lower()
    out = args.out or HERE / f"results_{name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
