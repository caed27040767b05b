"""The parity goldens' forward passes (docs/reference.md §G1), run the ways the numerical tests need.

Each golden is the reference's output for the fill-rule weights and a fixed input. :func:`run` gives our
outputs for its keys in float32 or float64, optionally under float32's emulated rounding
(tests/rounding.py), with Mask2Former's masked-attention choices free, recorded or imposed
(:class:`AttentionMaskPins`: the mask ``sigmoid(mask logit) < 0.5`` is a branch point like a ReLU's);
:func:`spreads` gives float32's rounding spread of every stored output, which ``tools/rounding_bounds.py``
stores in ``tests/fixtures/reference/golden_<name>.rounding.json``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

import models
from models.backbone import ViTAdapter
from models.checkpoint import load_official_state_dict
from models.heads.mask2former import semantic_inference
from reference_data import Golden, fill_state_dict, golden_input, load_golden, load_manifest
from rounding import emulated_float32, spread

# golden -> zoo entry (the BEiT backbone golden is that entry's backbone at img_size 224)
GOLDENS = {
    "upernet_deit_adapter_tiny_224": "upernet_deit_adapter_tiny_512_160k_ade20k",
    "beit_adapter_base_backbone_224": "mask2former_beit_adapter_base_480_40k_pascal_context_59",
    "mask2former_beit_adapter_base_pc59_480": "mask2former_beit_adapter_base_480_40k_pascal_context_59",
}
PARITY_RUNS = 2  # emulated runs per spread: the outputs are compared by norms, which concentrate


class AttentionMaskPins:
    """Mask2Former's per-stage attention masks: recorded in one run, imposed on another (by stage)."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []  # the resized mask logits each run compared with 0

    @contextlib.contextmanager
    def patched(self, head: nn.Module, impose: bool) -> Iterator[AttentionMaskPins]:
        predict = head._predict
        stage = iter(range(10**6))
        if not impose:
            self.masks = []
        self.logits = []

        def pinned(query, mask_features, attn_size):
            cls_pred, mask_pred, attn_mask = predict(query, mask_features, attn_size)
            if attn_mask is None:
                return cls_pred, mask_pred, attn_mask
            resized = F.interpolate(mask_pred, size=attn_size, mode="bilinear", align_corners=False)
            self.logits.append(resized.flatten(2).detach().clone())  # (B, Q, h, w) -> (B, Q, h*w)
            if impose:
                return cls_pred, mask_pred, self.masks[next(stage)]
            self.masks.append(attn_mask)
            return cls_pred, mask_pred, attn_mask

        head._predict = pinned
        try:
            yield self
        finally:
            del head._predict


@functools.cache
def _filled(name: str) -> nn.Module:
    entry = GOLDENS[name]
    manifest = load_manifest(entry)
    if name == "beit_adapter_base_backbone_224":
        config = models.get_config(entry, {"crop_size": [224, 224], "data.eval.stride": [160, 160]})
        backbone = models.ViTAdapter(config.backbone).eval()
        prefixed = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        sub = type(manifest)(
            config=manifest.config,
            keys=[(k, tuple(prefixed[k].shape), d) for k, _, d in manifest.keys if k.startswith("backbone.")],
            norm_weight_keys=manifest.norm_weight_keys,
            non_parameter_keys=manifest.non_parameter_keys,
        )
        state = fill_state_dict(sub, prefixed)
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()}, strict=True)
        return backbone
    original = ViTAdapter.init_weights
    ViTAdapter.init_weights = lambda self: None  # every entry is overwritten by the fill: skip the slow init
    try:
        model = models.create_segmentor(entry).eval()
    finally:
        ViTAdapter.init_weights = original
    report = load_official_state_dict(model, fill_state_dict(manifest, model.state_dict()))
    if not report.complete:
        raise AssertionError(f"{name}: the fill does not cover the model")
    return model


def model_for(name: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(_filled(name)).to(dtype)


def _cls_tokens(backbone: nn.Module) -> tuple[list[torch.Tensor], list]:
    tokens: list[torch.Tensor] = []
    hooks = [
        interaction.register_forward_hook(lambda _m, _i, out: tokens.append(out[2]))
        for interaction in backbone.interactions
    ]
    return tokens, hooks


def _forward(name: str, model: nn.Module, x: torch.Tensor, pins: AttentionMaskPins | None, impose: bool):
    if name == "upernet_deit_adapter_tiny_224":
        features = model.extract_features(x)
        logits = model.predict(x)
        return {
            **{f"backbone.f{i}": f for i, f in enumerate(features, start=1)},
            "decode_head.logits": model.decode_head(features),
            "auxiliary_head.logits": model.auxiliary_head(features),
            "segmentor.logits.sub8": logits[:, :, ::8, ::8],
            "segmentor.logits": logits,
        }
    backbone = model if name == "beit_adapter_base_backbone_224" else model.backbone
    tokens, hooks = _cls_tokens(backbone)
    try:
        if name == "beit_adapter_base_backbone_224":
            features = model(x)
            return {
                **{f"backbone.f{i}": f for i, f in enumerate(features, start=1)},
                "backbone.interactions.0.cls": tokens[0],
                "backbone.interactions.3.cls": tokens[3],
            }
        head = model.decode_head
        captured: dict[str, object] = {}
        hooks += [
            head.pixel_decoder.register_forward_hook(lambda _m, _i, out: captured.update(pixel_decoder=out)),
            head.register_forward_hook(lambda _m, _i, out: captured.update(stages=out)),
        ]
        with pins.patched(head, impose) if pins is not None else contextlib.nullcontext():
            logits = model.predict(x)
        mask_features, memories = captured["pixel_decoder"]
        cls_preds, mask_preds = captured["stages"]
        return {
            "decode_head.pixel_decoder.mask_features": mask_features,
            **{f"decode_head.pixel_decoder.multi_scale_memory{i}": m for i, m in enumerate(memories)},
            **{f"decode_head.cls_pred.{i}": c for i, c in enumerate(cls_preds)},
            **{f"decode_head.mask_pred.{i}": m for i, m in enumerate(mask_preds)},
            "decode_head.seg_mask": semantic_inference(cls_preds[-1], mask_preds[-1]),
            "segmentor.logits.sub8": logits[:, :, ::8, ::8],
            "segmentor.logits": logits,
            **{f"backbone.interactions.{i}.cls": cls for i, cls in enumerate(tokens)},
        }
    finally:
        for hook in hooks:
            hook.remove()


def run(
    name: str,
    dtype: torch.dtype,
    *,
    pins: AttentionMaskPins | None = None,
    impose: bool = False,
    emulate_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Our outputs for golden ``name`` (every stored key, full size; ``segmentor.logits`` whole)."""
    model = model_for(name, dtype)
    x = golden_input(load_golden(name)).to(dtype)
    # the input is float32 (exact in the float64 runs too): only the computation rounds
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if emulate_seed is not None:
            stack.enter_context(emulated_float32(emulate_seed))
        return {k: v.detach() for k, v in _forward(name, model, x, pins, impose).items()}


def stored(golden: Golden, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our outputs at the golden's stored subsample, as flat float64 tensors."""
    return {
        key: torch.from_numpy(golden.subsample(key, outputs[key])).double().reshape(-1)
        for key in golden.stored
        if not key.endswith(".argmax")
    }


def spreads(name: str, seeds: Iterator[int] | None = None) -> dict[str, dict]:
    """Float32's emulated rounding spread of every stored output of golden ``name`` (and, for Mask2Former,
    of the mask logits each attention mask thresholds: the tie bands)."""
    golden = load_golden(name)
    pins = AttentionMaskPins() if "mask2former" in name else None
    exact = run(name, torch.float64, pins=pins)
    reference = stored(golden, exact)
    exact_logits = list(pins.logits) if pins is not None else []
    deviations: dict[str, list[torch.Tensor]] = {key: [] for key in reference}
    bands: list[list[torch.Tensor]] = [[] for _ in exact_logits]
    for seed in seeds if seeds is not None else range(PARITY_RUNS):
        outputs = stored(golden, run(name, torch.float64, pins=pins, impose=True, emulate_seed=seed))
        for key, value in outputs.items():
            deviations[key].append(value - reference[key])
        for stage, value in enumerate(pins.logits if pins is not None else []):
            bands[stage].append(value - exact_logits[stage])
    out: dict[str, dict] = {
        "quantities": {
            key: {**spread(values), "exact_norm": float(reference[key].norm())}
            for key, values in deviations.items()
        }
    }
    if pins is not None:
        out["attention_mask_logits"] = [spread(values) for values in bands]
    return out
