"""Copy the reference data the tests need from ``../shared/reference`` into ``tests/fixtures/reference``.

The repository must stand on its own, so the tests read these compact copies:

* ``manifests/<config>.json.gz``: the official state-dict layout of each reference model
  (key -> shape, dtype; the norm-weight keys of the fill rule), from ``manifests/``.
* ``param_counts.json``: the reference code's exact parameter count per config, from
  ``param_counts.json``.
* ``golden_<name>.npz`` + ``golden_<name>.json``: outputs of the reference implementation for the
  fill-rule weights (``parity/README.md``), subsampled with the strides recorded in the json, plus
  checksums of the input and of a few filled tensors (``fill_checksums_*.json``).

Run: ``python tools/make_reference_fixtures.py [--shared ../shared]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"

# golden file -> (output name, fill-checksum file, {key: (channel stride, spatial stride)})
GOLDENS = {
    "golden_upernet_deit_adapter_tiny": (
        "upernet_deit_adapter_tiny_224",
        "fill_checksums_upernet_deit_adapter_tiny.json",
        {
            "backbone.f1": (1, 2),
            "backbone.f2": (1, 2),
            "backbone.f3": (1, 1),
            "backbone.f4": (1, 1),
            "decode_head.logits": (1, 2),
            "auxiliary_head.logits": (1, 1),
            "segmentor.logits.sub8": (1, 2),
            "segmentor.logits.argmax": (1, 1),
        },
    ),
    "golden_beit_adapter_base_backbone_img224": (
        "beit_adapter_base_backbone_224",
        "fill_checksums_mask2former_beit_adapter_base_pc59.json",
        {
            "backbone.f1": (2, 4),
            "backbone.f2": (2, 2),
            "backbone.f3": (2, 1),
            "backbone.f4": (1, 1),
            "backbone.interactions.0.cls": (1, 1),
            "backbone.interactions.3.cls": (1, 1),
        },
    ),
}
NUM_FILL_CHECKS = 40


def _subsample(array: np.ndarray, channel_stride: int, stride: int) -> np.ndarray:
    if array.ndim == 4:
        return array[:, ::channel_stride, ::stride, ::stride]
    if array.ndim == 3 and stride == 1 and channel_stride == 1:
        return array
    raise ValueError(f"no subsampling rule for shape {array.shape}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = parser.parse_args()
    ref = args.shared / "reference"
    (OUT / "manifests").mkdir(parents=True, exist_ok=True)

    for manifest_path in sorted((ref / "manifests").glob("*.json")):
        manifest = json.loads(manifest_path.read_text())
        compact = {
            "source": f"shared/reference/manifests/{manifest_path.name}",
            "config": manifest["config"],
            "keys": [[k, manifest["shapes"][k], manifest["dtypes"][k]] for k in manifest["shapes"]],
            "norm_weight_keys": manifest["norm_weight_keys"],
            "non_parameter_keys": manifest["non_parameter_keys"],
        }
        name = manifest_path.stem.removesuffix("_ss")
        with gzip.open(OUT / "manifests" / f"{name}.json.gz", "wt", compresslevel=9) as handle:
            json.dump(compact, handle, separators=(",", ":"))

    counts = json.loads((ref / "param_counts.json").read_text())
    (OUT / "param_counts.json").write_text(
        json.dumps(
            {
                "source": "shared/reference/param_counts.json",
                "total_params": {k.removesuffix("_ss"): v["total_params"] for k, v in counts.items()},
                "per_prefix": {k.removesuffix("_ss"): v["per_prefix"] for k, v in counts.items()},
            },
            indent=1,
        )
        + "\n"
    )

    for golden, (name, fill_file, keys) in GOLDENS.items():
        meta = json.loads((ref / "parity" / f"{golden}.json").read_text())
        npz = np.load(next((ref / "parity").glob(f"{golden}_*.npz")))
        arrays, strides = {}, {}
        for key, (channel_stride, stride) in keys.items():
            value = npz[key]
            if key.endswith(".argmax"):
                arrays[key] = value.astype(np.uint8)
            else:
                arrays[key] = np.ascontiguousarray(_subsample(value, channel_stride, stride)).astype(
                    np.float32
                )
            strides[key] = {
                "channel_stride": channel_stride,
                "stride": stride,
                "full_shape": list(value.shape),
            }
        np.savez_compressed(OUT / f"golden_{name}.npz", **arrays)
        fills = json.loads((ref / "parity" / fill_file).read_text())
        checks = dict(list(fills.items())[:NUM_FILL_CHECKS])
        info = {
            "source": f"shared/reference/parity/{golden}.json and its npz",
            "config": meta["config"],
            "what": meta["what"],
            "backbone_overrides": meta.get("backbone_overrides"),
            "input_shape": list(npz["input"].shape),
            "input_sum": float(npz["input"].astype(np.float64).sum()),
            "input_first4": npz["input"].reshape(-1)[:4].tolist(),
            "tolerance_atol": 1e-4,
            "stored": strides,
            "fill_checks": checks,
        }
        (OUT / f"golden_{name}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
