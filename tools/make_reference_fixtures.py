"""Copy the reference data the tests need from the reference notes' folder into ``tests/fixtures/reference``.

The repository must stand on its own, so the tests read these compact copies:

* ``manifests/<config>.json.gz``: the official state-dict layout of each reference model
  (key -> shape, dtype; the norm-weight keys of the fill rule), from ``manifests/``.
* ``param_counts.json``: the reference code's exact parameter count per config, from
  ``param_counts.json``.
* ``golden_<name>.npz`` + ``golden_<name>.json``: outputs of the reference implementation for the
  fill-rule weights (``docs/reference.md`` §G1.1), subsampled with the strides recorded in the json, plus
  checksums of the input and of a few filled tensors (``fill_checksums_*.json``), the tolerance of
  each key, and for Mask2Former the statistics of the masked-attention masks.
* ``train_step_<name>.npz`` + ``train_step_<name>.json.gz``: the recorded training step
  (``docs/reference.md`` §T, from ``train_step/``): losses (float32 and the float64 rerun), every
  parameter's group, lr and weight decay, the lr of every group at the recorded iterations, the
  gradients and the iteration-1500 AdamW update of the chosen tensors (at most
  :data:`TRAIN_STEP_VALUES` values each, every ``stride``-th element of the flattened tensor), their
  full-tensor norms (float32 and the float64 rerun's), the recording's float32-vs-float64 difference of
  each (its own rounding floor), the pre-step weight sums (a check of the fill) and the BatchNorm running
  statistics.
* Each golden output also carries the recording's float32-vs-float64 difference (``float32_floor``).

Files whose content is unchanged are not rewritten (gzip and zip headers carry timestamps, so a
rewrite would change the bytes of identical data).

Run: ``python tools/make_reference_fixtures.py --reference DIR`` (the folder holding ``manifests/``,
``param_counts.json``, ``parity/`` and ``train_step/``; what each is: ``docs/reference.md`` §G1-§G3, §T).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"

# golden file -> (output name, fill-checksum file, {key: (channel stride, spatial stride)})
# A key stored in the reference npz only as a subsample ``KEY.subN`` is written as ``KEY`` with a
# spatial stride that is a multiple of N (the json records the full shape and the total stride).
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
    "golden_mask2former_beit_adapter_base_pc59": (
        "mask2former_beit_adapter_base_pc59_480",
        "fill_checksums_mask2former_beit_adapter_base_pc59.json",
        {
            "decode_head.pixel_decoder.multi_scale_memory0": (2, 1),
            "decode_head.pixel_decoder.multi_scale_memory1": (2, 2),
            "decode_head.pixel_decoder.multi_scale_memory2": (4, 4),
            "decode_head.pixel_decoder.mask_features": (2, 8),
            **{f"decode_head.cls_pred.{i}": (1, 1) for i in range(10)},
            "decode_head.mask_pred.9": (2, 4),
            "decode_head.seg_mask": (1, 4),
            "segmentor.logits.sub8": (1, 2),
            "segmentor.logits.argmax": (1, 1),
            **{f"backbone.interactions.{i}.cls": (1, 1) for i in range(4)},
        },
    ),
}
NUM_FILL_CHECKS = 40
# docs/reference.md §G1.4: the masked-attention threshold can flip near-threshold entries,
# which moves the per-stage class and mask predictions by up to ~7e-5
ATOL = 1e-4
STAGE_ATOL = 5e-4
STAGE_PREFIXES = ("decode_head.cls_pred.", "decode_head.mask_pred.")


def _subsample(array: np.ndarray, channel_stride: int, stride: int) -> np.ndarray:
    if array.ndim == 4:
        return array[:, ::channel_stride, ::stride, ::stride]
    if array.ndim == 3 and stride == 1 and channel_stride == 1:
        return array
    raise ValueError(f"no subsampling rule for shape {array.shape}")


def _source_key(npz: np.lib.npyio.NpzFile, key: str) -> tuple[str, int]:
    """The npz entry holding ``key`` and its subsampling stride (1, or N for ``KEY.subN``)."""
    if key in npz.files:
        return key, 1
    subsampled = [name for name in npz.files if name.startswith(f"{key}.sub")]
    if len(subsampled) != 1:
        raise KeyError(f"{key} is not in the reference npz (entries: {npz.files})")
    return subsampled[0], int(subsampled[0].rsplit(".sub", 1)[1])


def _fill_checks(fills: dict, golden: str) -> dict:
    """The first fill checksums, plus for Mask2Former every head key outside the repeated layers 1+."""
    checks = dict(list(fills.items())[:NUM_FILL_CHECKS])
    if "mask2former" in golden:
        for key, value in fills.items():
            repeated = any(f"layers.{i}." in key for i in range(1, 10))
            if key.startswith("decode_head.") and not repeated:
                checks[key] = value
    return checks


def _write_text(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _write_gzip_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, separators=(",", ":"))
    if path.exists():
        with gzip.open(path, "rt") as handle:
            if handle.read() == text:
                return
    with gzip.open(path, "wt", compresslevel=9) as handle:
        handle.write(text)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    if path.exists():
        with np.load(path) as old:
            same = sorted(old.files) == sorted(arrays) and all(
                old[k].dtype == v.dtype and np.array_equal(old[k], v) for k, v in arrays.items()
            )
        if same:
            return
    np.savez_compressed(path, **arrays)


TRAIN_STEPS = {"golden_train_step_upernet_deit_adapter_tiny": "upernet_deit_adapter_tiny_96x128"}
TRAIN_STEP_VALUES = 1024  # values kept per chosen tensor (the recording keeps up to 4096)


def _flat_subsample(stored: np.ndarray, stored_stride: int) -> tuple[np.ndarray, int]:
    """At most TRAIN_STEP_VALUES of a recorded ``flat[::stored_stride]`` array, and the total stride."""
    flat = stored.reshape(-1)
    extra = -(-flat.size // TRAIN_STEP_VALUES)  # ceil
    return np.ascontiguousarray(flat[::extra]).astype(np.float32), stored_stride * extra


def _train_step(ref: Path, golden: str, name: str) -> None:
    meta = json.loads((ref / "train_step" / f"{golden}.json").read_text())
    npz = np.load(ref / "train_step" / f"{golden}.npz")
    arrays: dict[str, np.ndarray] = {}
    chosen = {}
    for key in meta["chosen"]:
        info = meta["grad"][key]
        suffix = "" if info["stored"] == "full" else f".{info['stored']}"
        stored_stride = 1 if info["stored"] == "full" else int(info["stored"].removeprefix("flat_sub"))
        arrays[f"grad/{key}"], stride = _flat_subsample(npz[f"grad/{key}{suffix}"], stored_stride)
        arrays[f"delta1500/{key}"], _ = _flat_subsample(npz[f"delta_iter1500/{key}{suffix}"], stored_stride)
        chosen[key] = {
            "shape": info["shape"],
            "stride": stride,
            "grad_norm": meta["grad_stats_all"][key]["norm"],
            "grad_max_abs": meta["grad_stats_all"][key]["max_abs"],
            "param_sum_before": meta["param_stats_before_step"][key]["sum"],
            # the float64 rerun's full-gradient norm, and the recording's float32-vs-float64 difference
            # (largest over its stored subsample, a superset of ours): its own rounding floor
            "grad_norm_float64": meta["float64_rerun"]["grad_norm_float64"][key],
            "grad_float32_floor": meta["arrays"][f"grad/{key}{suffix}"]["max_abs_diff_vs_float64"],
        }
    for key in npz.files:
        if key.startswith("bn/"):
            arrays[key] = npz[key].astype(np.float32)
    _write_npz(OUT / f"train_step_{name}.npz", arrays)
    groups = [
        {k: group[k] for k in ("group_name", "lr", "lr_scale", "weight_decay", "param_names")}
        for group in meta["optimizer"]["groups"]
    ]
    info = {
        "source": f"reference train_step/{golden}.json and its npz",
        "settings": {
            k: meta["settings"][k] for k in ("torch", "threads", "deterministic", "dtype", "img", "gt")
        },
        "model_cfg_changes": meta["settings"]["model_cfg_changes"],
        "log_vars": meta["log_vars"],
        "float64_losses": {k: v[0] for k, v in meta["float64_rerun"]["losses"].items()},
        "float64_total_loss": meta["float64_rerun"]["total_loss"],
        "optimizer": {k: v for k, v in meta["optimizer"]["defaults"].items() if k in ("betas", "eps")},
        "groups": groups,
        "max_iters": meta["lr_schedule"]["max_iters"],
        "lr_at_iter": meta["lr_schedule"]["lr_at_iter"],
        "step_iter1500_group_lr": meta["step_iter1500"]["group_lr"],
        "chosen": chosen,
        "bn": meta["bn"],
        # the recording's own float32-vs-float64 difference of each BatchNorm statistic (its rounding floor)
        "bn_float32_floor": {
            key.removeprefix("bn/"): value["max_abs_diff_vs_float64"]
            for key, value in meta["arrays"].items()
            if key.startswith("bn/") and key.endswith(".after")
        },
    }
    _write_gzip_json(OUT / f"train_step_{name}.json.gz", info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="the reference folder (manifests/, param_counts.json, parity/, train_step/)",
    )
    args = parser.parse_args()
    ref = args.reference
    (OUT / "manifests").mkdir(parents=True, exist_ok=True)

    for manifest_path in sorted((ref / "manifests").glob("*.json")):
        manifest = json.loads(manifest_path.read_text())
        compact = {
            "source": f"reference manifests/{manifest_path.name}",
            "config": manifest["config"],
            "keys": [[k, manifest["shapes"][k], manifest["dtypes"][k]] for k in manifest["shapes"]],
            "norm_weight_keys": manifest["norm_weight_keys"],
            "non_parameter_keys": manifest["non_parameter_keys"],
        }
        name = manifest_path.stem.removesuffix("_ss")
        _write_gzip_json(OUT / "manifests" / f"{name}.json.gz", compact)

    counts = json.loads((ref / "param_counts.json").read_text())
    _write_text(
        OUT / "param_counts.json",
        json.dumps(
            {
                "source": "reference param_counts.json",
                "total_params": {k.removesuffix("_ss"): v["total_params"] for k, v in counts.items()},
                "per_prefix": {k.removesuffix("_ss"): v["per_prefix"] for k, v in counts.items()},
            },
            indent=1,
        )
        + "\n",
    )

    for golden, (name, fill_file, keys) in GOLDENS.items():
        meta = json.loads((ref / "parity" / f"{golden}.json").read_text())
        npz = np.load(next((ref / "parity").glob(f"{golden}_*.npz")))
        outputs = meta["inputs"][next(iter(meta["inputs"]))]["outputs"] if "inputs" in meta else {}
        arrays, strides = {}, {}
        for key, (channel_stride, stride) in keys.items():
            source, base = _source_key(npz, key)
            if stride % base:
                raise ValueError(f"{key}: stride {stride} is not a multiple of the stored subsample {base}")
            value = npz[source]
            if key.endswith(".argmax"):
                arrays[key] = value.astype(np.uint8)
            else:
                arrays[key] = np.ascontiguousarray(_subsample(value, channel_stride, stride // base)).astype(
                    np.float32
                )
            full_shape = list(value.shape) if base == 1 else outputs[key]["shape"]
            strides[key] = {
                "channel_stride": channel_stride,
                "stride": stride,
                "full_shape": full_shape,
            }
            if not key.endswith(".argmax"):  # the recording's float32-vs-float64 difference (its floor)
                record = outputs.get(key.removesuffix(".sub8"), {})
                if "max_abs_diff_vs_float64" in record:
                    strides[key]["float32_floor"] = record["max_abs_diff_vs_float64"]
        _write_npz(OUT / f"golden_{name}.npz", arrays)
        fills = json.loads((ref / "parity" / fill_file).read_text())
        checks = _fill_checks(fills, golden)
        info = {
            "source": f"reference parity/{golden}.json and its npz",
            "config": meta["config"],
            "what": meta["what"],
            "backbone_overrides": meta.get("backbone_overrides"),
            "input_shape": list(npz["input"].shape),
            "input_sum": float(npz["input"].astype(np.float64).sum()),
            "input_first4": npz["input"].reshape(-1)[:4].tolist(),
            "tolerance_atol": ATOL,
            "stored": strides,
            "fill_checks": checks,
        }
        if "mask2former" in golden:
            info["tolerances"] = {
                key: STAGE_ATOL if key.startswith(STAGE_PREFIXES) else ATOL
                for key in keys
                if not key.endswith(".argmax")
            }
            info["mask2former_attn_masks"] = meta["inputs"][next(iter(meta["inputs"]))][
                "mask2former_attn_masks"
            ]
        _write_text(OUT / f"golden_{name}.json", json.dumps(info, indent=1) + "\n")
    for golden, name in TRAIN_STEPS.items():
        _train_step(ref, golden, name)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
