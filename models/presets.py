"""Named sets of overrides: the tiny models the demo and the tests train on a CPU in seconds.

A preset shrinks any zoo entry of a head kind to a model of the same structure (same trunk kind, adapter,
head and recipe) with 64-pixel inputs, 4 blocks of width 64 and narrow heads. It is applied before the
user's overrides (:func:`models.zoo.get_config`), which win field by field. The demo's ``params.yaml`` and
the tests use the ``tiny`` preset, so the tiny model is defined here only.
"""

from __future__ import annotations

from typing import Any

from models.config import SegmentorConfig

# the trunk, adapter and 64-pixel data settings every tiny model shares
_TINY_COMMON: dict[str, Any] = {
    "backbone.trunk.embed_dim": 64,
    "backbone.trunk.depth": 4,
    "backbone.trunk.num_heads": 2,
    "backbone.adapter.deform_num_heads": 2,
    "backbone.adapter.conv_inplane": 16,
    "data.train.crop_size": [64, 64],  # the eval crop, BEiT img_size and MS padding follow it
    "data.train.img_scale": [128, 64],
    "data.eval.img_scale": [128, 64],
    "data.eval.stride": [48, 48],
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "upernet": {
            **_TINY_COMMON,
            "decode_head.channels": 32,
            "auxiliary_head.channels": 32,
        },
        "mask2former": {
            **_TINY_COMMON,
            "backbone.with_cp": False,
            "decode_head.feat_channels": 32,
            "decode_head.out_channels": 32,
            "decode_head.num_queries": 16,
            "decode_head.encoder_num_heads": 2,
            "decode_head.decoder_num_heads": 2,
            "decode_head.encoder_ffn_channels": 64,
            "decode_head.decoder_ffn_channels": 64,
            "decode_head.train_num_points": 256,
            "decode_head.with_cp": False,
        },
    }
}


def preset_overrides(config: SegmentorConfig, preset: str | None) -> dict[str, Any]:
    """The overrides of ``preset`` for ``config``'s head kind (empty for None).

    Raises:
        ValueError: an unknown preset, naming the known ones.
    """
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    by_head = PRESETS[preset]
    if config.head not in by_head:
        raise ValueError(f"preset {preset!r} has no settings for {config.head} entries ({config.name})")
    return dict(by_head[config.head])
