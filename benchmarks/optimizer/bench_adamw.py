"""AdamW's step on the demo's tiny model: torch's per-tensor loop (its CPU default) against ``foreach``.

``pipelines.engine.optim.build_optimizer`` asks for the multi-tensor (``foreach``) implementation, which
torch already picks on CUDA. This measures the step time of both on the demo's model (the COCO-Stuff stage
of ``params.yaml``: Mask2Former BEiT-Adapter, ``tiny`` preset, its overrides) with the recipe's parameter
groups, from one set of gradients, and checks that the parameters after the steps are bitwise equal.

Run: ``.venv/bin/python benchmarks/optimizer/bench_adamw.py [--steps 100] [--out benchmarks/optimizer/results.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.train_step.common import metadata  # noqa: E402
from data.atomic import write_json_atomic  # noqa: E402
from models.builder import create_segmentor  # noqa: E402
from pipelines.config.params import load_params  # noqa: E402
from pipelines.engine.optim import build_optimizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per implementation (default 100)")
    parser.add_argument("--run", default="coco_stage", help="the params.yaml run whose model is used")
    parser.add_argument("--out", type=Path, help="write the results here (JSON) as well as printing them")
    args = parser.parse_args()

    run = load_params(REPO / "params.yaml").run(args.run)
    config = run.model_config()
    torch.manual_seed(0)
    model = create_segmentor(run.config, run.overrides, preset=run.preset).train()
    crop = config.data.train.crop_size
    images = torch.randn(4, 3, *crop)
    labels = torch.randint(0, 3, (4, *crop))
    model.loss(images, labels)["loss"].backward()

    results: dict[str, dict] = {}
    after: dict[str, list[torch.Tensor]] = {}
    for name, foreach in (("per_tensor", False), ("foreach", True)):
        copy_ = copy.deepcopy(model)
        for ours, theirs in zip(copy_.parameters(), model.parameters(), strict=True):
            ours.grad = None if theirs.grad is None else theirs.grad.clone()
        optimizer = build_optimizer(copy_, config.optimizer)
        for group in optimizer.param_groups:
            group["foreach"] = foreach
        for _ in range(3):  # warm-up (state allocation)
            optimizer.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        seconds = (time.perf_counter() - start) / args.steps
        results[name] = {"ms_per_step": round(seconds * 1000, 2)}
        after[name] = [p.detach().clone() for p in copy_.parameters()]
    equal = all(torch.equal(a, b) for a, b in zip(after["per_tensor"], after["foreach"], strict=True))
    out = {
        "what": __doc__.splitlines()[0],
        "model": {"run": args.run, "config": run.config, "preset": run.preset},
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": sum(1 for _ in model.parameters()),
        "steps": args.steps,
        "results": results,
        "bitwise_equal_after_all_steps": equal,
        "meta": metadata(torch.device("cpu"), "cpu"),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        write_json_atomic(args.out, out)
    if not equal:
        raise SystemExit("foreach and per-tensor AdamW disagree: see the results")


if __name__ == "__main__":
    main()
