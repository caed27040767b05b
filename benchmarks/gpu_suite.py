"""The GPU suite: one prepared run on a lent GPU machine checks the kernels and measures every target.

Run from the repository root, on the machine's own stack (python3, torch, triton, timm, numpy, scipy,
pyyaml, opencv, pillow; nothing else needed: no mlflow, prefect, dvc or webdataset is imported):

    PYTHONPATH=. python3 benchmarks/gpu_suite.py --out $OUT

(through the device tool: timeout_s 480; the steps keep to 400 s, about 7 minutes with start-up). One JSON,
DIR/gpu_suite.json, is rewritten (temp file + rename) after every configuration, so a killed run keeps
what finished; DIR/gpu_suite.log has the log. The last lines printed are a table: step, status, time,
headline figure against its target.

Steps (select with --only a,c,...), each with its own time budget; a step that runs out of it stops
at the next configuration (status "timeout", what ran is kept; a hard stop follows shortly after):
  a  parity    (90 s) Triton backend vs the float64 PyTorch reference on the grid of
               tests/cuda_ops/test_triton_backend.py: forward and the value / sampling-location /
               attention-weight gradients; fp32, bf16, fp16 values (fp32 locations); non-square and
               mixed on-chip/atomic levels, exact borders, 32 and 64 channels; both backward paths;
               fresh random inputs; outputs poisoned with NaN. Per case: relative errors, pass/fail.
  b  kernel    (75 s) forward, backward, forward+backward at the model's shapes (injector, extractor,
               Mask2Former pixel decoder; batch 8, 2, 16), triton vs reference, speed-up, and each
               against its memory floor from a measured device-to-device copy bandwidth.
  c  train     (150 s) UperNet ViT-Adapter-B 512 (bf16 autocast, fp32 with TF32; batch 8 and 16; with_cp off
               and on) and Mask2Former BEiT-Adapter-L 896 (one image; bf16, fp32; with_cp on):
               images/s, peak memory, the deformable-attention backend that ran; OOM recorded.
  d  eval      (60 s) UperNet ViT-Adapter-B through the real evaluator, single-scale and multi-scale + flip
               on 512 x 683 images: images/s, peak memory, projected time of ADE20K val (2,000 images).
  e  dist      (30 s) one-process NCCL group (loopback TCP), the project's init_distributed and Trainer
               (SyncBatchNorm conversion, DDP): 20 bf16 iterations of a tiny UperNet; the loss must fall.

Targets (H100 figures; an H200 moves memory-bound numbers about 1.4x):
  deformable attention fwd+bwd, bf16, batch 8: >= 15x the reference path, within 3x its memory floor
  UperNet ViT-Adapter-B 512 training: >= 110 images/s per GPU in bf16 (160 ambitious)
  Mask2Former BEiT-Adapter-L 896 training at one image per GPU: within 80 GB
  ADE20K val: single-scale < 30 s, multi-scale + flip < 8 min (projected, one GPU)

--dry-run runs every step at toy sizes on the CPU (tiny models, a small parity grid through the Triton
interpreter, gloo, a couple of iterations) in well under 90 s: for CI; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_NAME, LOG_NAME = "gpu_suite.json", "gpu_suite.log"
SUITE_LIMIT_S, DRY_SUITE_LIMIT_S = 400.0, 85.0  # all steps together
HARD_STOP_GRACE_S = 20.0  # past a step's budget, an alarm stops it wherever it is
STATUSES = ("ok", "failed", "error", "timeout", "skipped")

log = logging.getLogger("gpu_suite")


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: its key, name, budgets (GPU, dry run), the target it measures, the module function."""

    key: str
    name: str
    budget_s: float
    dry_budget_s: float
    target: str
    function: str  # "module:function", imported after the environment is set up


STEPS = (
    Step(
        "a",
        "parity",
        90,
        25,
        "rel. L2 <= 1e-5 / 1e-2 / 2e-3 (fp32/bf16/fp16)",
        "gpu_suite_kernel:step_parity",
    ),
    Step("b", "kernel", 75, 25, ">= 15x reference, <= 3x floor (bf16 b8)", "gpu_suite_kernel:step_kernel"),
    Step("c", "train", 150, 35, ">= 110 (160) img/s; M2F-L <= 80 GB", "gpu_suite_models:step_train"),
    Step("d", "eval", 60, 20, "val SS < 30 s, MS+flip < 480 s", "gpu_suite_models:step_eval"),
    Step("e", "dist", 30, 20, "loss decreases; SyncBN + DDP", "gpu_suite_models:step_distributed"),
)


class StepTimeoutError(BaseException):
    """Raised by the alarm when a step overruns its budget and grace (a BaseException, so library code
    that catches Exception does not swallow it)."""


@dataclasses.dataclass
class Context:
    """What a step sees: mode, device, its deadline, and ``save`` to write the results so far."""

    dry_run: bool
    device: Any  # torch.device of steps c, d, e
    seed: int
    parity_workers: int
    save: Callable[[], None]
    deadline: float = 0.0  # time.monotonic()

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.time_left() <= 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {RESULT_NAME} and {LOG_NAME}")
    parser.add_argument("--only", help="comma-separated steps to run, e.g. a,b (default: a,b,c,d,e)")
    parser.add_argument(
        "--dry-run", action="store_true", help="toy sizes on the CPU (CI); figures mean nothing"
    )
    parser.add_argument(
        "--parity-workers",
        type=int,
        help="processes compiling and running the parity grid "
        "(default: CPU cores - 2, at most 12; dry run 2; 0: in this process)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed of the parity inputs (default: from the clock; recorded)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        help=f"seconds for all steps (default {SUITE_LIMIT_S:g}; dry run {DRY_SUITE_LIMIT_S:g})",
    )
    parser.add_argument(
        "--git-commit", help="commit to record when the tree has no .git (e.g. on the device machine)"
    )
    args = parser.parse_args(argv)
    keys = [k.strip() for k in (args.only or ",".join(s.key for s in STEPS)).split(",") if k.strip()]
    unknown = sorted(set(keys) - {s.key for s in STEPS})
    if unknown or not keys:
        parser.error(f"--only takes steps among {[s.key for s in STEPS]}, got {args.only!r}")
    args.steps = [s for s in STEPS if s.key in keys]
    return args


def git_commit(override: str | None) -> str | None:
    """HEAD's commit: ``--git-commit``, else ``git rev-parse``, else read from ``.git`` directly."""
    if override:
        return override
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except OSError:
        pass  # no git on this machine: read the files
    git = REPO_ROOT / ".git"
    if git.is_file():  # a worktree: "gitdir: <path>"
        git = Path(git.read_text().split(":", 1)[1].strip())
    head = git / "HEAD"
    if not head.is_file():
        return None
    content = head.read_text().strip()
    if not content.startswith("ref:"):
        return content
    ref = content.split(":", 1)[1].strip()
    roots = [git]
    if (git / "commondir").is_file():  # a worktree's refs live in the main repository's .git
        roots.append((git / (git / "commondir").read_text().strip()).resolve())
    for root in roots:
        if (root / ref).is_file():
            return (root / ref).read_text().strip()
        packed = root / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    return None


def metadata(args: argparse.Namespace, torch: Any, device: Any) -> dict[str, Any]:
    """Device, versions, date, commit and command of this run (what cannot be read is left out, with why)."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    meta = {
        "mode": "dry run: toy sizes on the CPU, NOT a measurement" if args.dry_run else "gpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python3", *sys.argv]),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "model_steps_device": str(device),
        "device_memory_GB": props.total_memory / 1e9 if props else None,
        "compute_capability": f"{props.major}.{props.minor}" if props else None,
        "multiprocessors": props.multi_processor_count if props else None,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "git_commit": git_commit(args.git_commit),
        "seed": args.seed,
    }
    try:  # the project's helpers: a failure here must not cost the run
        from benchmarks.train_step.common import _cpu_model, _driver_version
        from cuda_ops import BACKEND_ENV

        meta["driver"] = _driver_version() if cuda else None
        meta["cpu"] = _cpu_model()
        meta["deform_attn_backend_env"] = {BACKEND_ENV: os.environ.get(BACKEND_ENV)}
    except Exception as exc:  # recorded; the steps that need these modules report their own errors
        meta["metadata_error"] = repr(exc)
    return meta


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` atomically: a temp file beside ``path``, then a rename."""
    text = json.dumps(results, indent=1, default=str) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _on_alarm(signum: int, frame: Any) -> None:
    raise StepTimeoutError("the step overran its budget and grace period")


def run_step(step: Step, ctx: Context, record: dict[str, Any], limit_at: float) -> None:
    """Run one step under its budget; its status, seconds and any error go into ``record``."""
    budget = step.dry_budget_s if ctx.dry_run else step.budget_s
    start = time.monotonic()
    ctx.deadline = min(start + budget, limit_at)
    record.update({"name": step.name, "status": "running", "budget_s": budget, "target": step.target})
    if ctx.expired():
        record.update(
            status="skipped", reason="the suite's time limit was reached before this step", seconds=0.0
        )
        ctx.save()
        return
    ctx.save()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, ctx.time_left() + HARD_STOP_GRACE_S))
    try:
        module, function = step.function.split(":")
        fn = getattr(importlib.import_module(f"benchmarks.{module}"), function)
        status = fn(ctx, record)
    except StepTimeoutError:
        status = "timeout"
        record["error"] = f"stopped by the hard limit ({budget:g} s budget + {HARD_STOP_GRACE_S:g} s)"
        record["traceback"] = traceback.format_exc()
    except Exception as exc:  # every step's failure is recorded, and the suite goes on
        status = "error"
        record["error"] = repr(exc)
        record["traceback"] = traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    record["status"] = status if status in STATUSES else "error"
    record["seconds"] = time.monotonic() - start
    log.info("step %s (%s): %s in %.1f s", step.key, step.name, record["status"], record["seconds"])
    _release_memory()
    ctx.save()


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(results: dict[str, Any]) -> str:
    """The closing table: step, status, seconds, headline figure vs target."""
    lines = [f"{'step':<10} {'status':<8} {'time':>7}  headline  |  target", "-" * 100]
    for key, record in results["steps"].items():
        headline = record.get("headline") or record.get("reason") or record.get("error") or "-"
        if record.get("status") == "error" and record.get("error"):
            headline = f"{record['error'].strip().splitlines()[0][:150]} (traceback in the JSON)"
        lines.append(
            f"{key + ' ' + record.get('name', ''):<10} {record.get('status', '?'):<8} "
            f"{record.get('seconds', 0.0):6.1f}s  {headline}  |  {record.get('target', '')}"
        )
    lines.append(f"{results['meta'].get('device')} · {results['meta'].get('mode')} · {results['path']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(args.out / LOG_NAME, mode="w")],
    )
    import torch  # importing torch does not import triton

    cuda = torch.cuda.is_available()
    if args.dry_run and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: kernels on CPU tensors
    elif not args.dry_run:
        if not cuda:
            print("no CUDA device: run this on the GPU machine, or pass --dry-run", file=sys.stderr)
            return 2
        if os.environ.pop("TRITON_INTERPRET", None) is not None:
            log.warning("TRITON_INTERPRET was set: unset, so the kernels compile for the GPU")
    if args.dry_run:
        torch.set_num_threads(1)  # OpenMP threads spin-waiting on a busy shared core slow tiny models
    if args.seed is None:
        args.seed = int(time.time()) % 100_000
    if args.parity_workers is None:
        args.parity_workers = 2 if args.dry_run else min(12, max(1, (os.cpu_count() or 2) - 2))
    device = torch.device("cpu" if args.dry_run else "cuda")
    path = args.out / RESULT_NAME
    results: dict[str, Any] = {"suite": "benchmarks/gpu_suite.py", "path": str(path), "steps": {}}
    results["meta"] = metadata(args, torch, device)
    results["targets"] = {s.key: s.target for s in args.steps}
    ctx = Context(args.dry_run, device, args.seed, args.parity_workers, lambda: write_json(path, results))
    limit = args.time_limit or (DRY_SUITE_LIMIT_S if args.dry_run else SUITE_LIMIT_S)
    limit_at = time.monotonic() + limit
    log.info(
        "GPU suite on %s: steps %s, %g s in all",
        results["meta"]["device"],
        [s.key for s in args.steps],
        limit,
    )
    for step in args.steps:
        results["steps"][step.key] = record = {}
        run_step(step, ctx, record, limit_at)
    write_json(path, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # also without PYTHONPATH=.
    sys.exit(main())
