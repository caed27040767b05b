"""Parameter counts of the zoo entries, counted on the meta device and stored, so listing the zoo is instant.

Each entry maps to (digest of its config, count). :func:`parameter_count` returns the stored count when the
config's digest matches (the entry as the zoo defines it) and counts on the meta device otherwise (an entry
with overrides, or a table gone stale). Regenerate with ``python tools/update_param_counts.py``; a test
keeps the table equal to fresh counts.
"""

from __future__ import annotations

import hashlib
import json

from models.config import SegmentorConfig


def config_digest(config: SegmentorConfig) -> str:
    """A short sha256 of the whole config (any field changed, another digest)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def parameter_count(config: SegmentorConfig) -> int:
    """The number of parameters of the model ``config`` builds (stored when known, else counted on meta)."""
    stored = COUNTS.get(config.name)
    if stored is not None and stored[0] == config_digest(config):
        return stored[1]
    from models.builder import count_parameters

    return count_parameters(config)


COUNTS: dict[str, tuple[str, int]] = {
    "upernet_deit_adapter_tiny_512_160k_ade20k": ("e0b5daa1db23fc0f", 36062428),
    "upernet_deit_adapter_small_512_160k_ade20k": ("0e1d6412a5287bdd", 57614908),
    "upernet_deit_adapter_base_512_160k_ade20k": ("91837bcbb256b812", 133636876),
    "upernet_augreg_adapter_tiny_512_160k_ade20k": ("868f21f4b73c7f88", 36062428),
    "upernet_augreg_adapter_base_512_160k_ade20k": ("e3039557a8af7656", 133928716),
    "upernet_augreg_adapter_large_512_160k_ade20k": ("67b60e2ea85b6673", 363802092),
    "upernet_beit_adapter_large_640_160k_ade20k": ("8a1ff43634d3bdd3", 451919852),
    "mask2former_beit_adapter_large_640_160k_ade20k": ("d09d0f9cd853020e", 568204887),
    "mask2former_beit_adapter_large_896_80k_ade20k": ("7f513bb7606d48be", 570744407),
    "mask2former_beitv2_adapter_large_896_160k_ade20k": ("f2c38c17275843a0", 570744407),
    "mask2former_beitv2_adapter_large_896_80k_ade20k": ("31741c2f91d48f50", 570744407),
    "mask2former_beit_adapter_base_480_40k_pascal_context_59": ("0844f84850f6a6e5", 120150684),
    "upernet_beit_adapter_large_480_80k_pascal_context_59": ("89ca7d959db5e572", 450743350),
    "mask2former_beit_adapter_large_480_40k_pascal_context_59": ("43362e36cb9132b6", 567051772),
    "mask2former_beit_adapter_large_896_80k_cocostuff164k": ("7a829777eeb6d52b", 570765932),
    "mask2former_beitv2_adapter_large_896_80k_cocostuff164k": ("06e7db813ac2960e", 570765932),
    "upernet_dinov3_adapter_large_512_160k_ade20k": ("005ddfdbd3878f76", 363142636),
    "mask2former_dinov3_adapter_large_512_160k_ade20k": ("33e06d6ca84f1edb", 565762135),
    "upernet_dinov3_adapter_large_640_160k_ade20k": ("b741911148f1d103", 449477100),
    "mask2former_dinov3_adapter_large_640_160k_ade20k": ("f8f7669f99887a56", 565762135),
    "upernet_dinov2_adapter_large_512_160k_ade20k": ("6a36656dd976a98e", 364430828),
    "mask2former_dinov2_adapter_large_512_160k_ade20k": ("bc935e564789c8fc", 567050327),
    "upernet_eva02_adapter_large_448_160k_ade20k": ("cc1cc027794b48f7", 364118444),
    "mask2former_eva02_adapter_large_448_160k_ade20k": ("287eea1953934882", 566737943),
}
