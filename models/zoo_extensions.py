"""Extension entries: ViT-Adapter on DINOv3, DINOv2 and EVA-02 trunks (built from timm), torch-free.

These rows are NOT part of the published reproduction: nothing was published for them, so their
:class:`models.config.Published` carries no numbers (``extension=True``), and
``models.list_configs()`` lists them only with ``extensions=True``. Each recipe is copied from the
nearest published row (same trunk size and crop where one exists) and says so in its notes; what
comes from the trunk instead is the normalisation its authors trained with and its pretrained file
(timm's layout, :mod:`models.pretrained_timm`).

* UperNet, crop <= 512: the AugReg-L row (``upernet_augreg_adapter_large_512_160k_ade20k``): AdamW
  lr 2e-5, wd 0.05, layer decay 0.95 over 24 layers, drop path 0.4, UperNet width 512, FCN auxiliary.
* UperNet, crop 640: the BEiT-L row (``upernet_beit_adapter_large_640_160k_ade20k``): layer decay
  0.9, drop path 0.3, UperNet width 1024, SETR-resize multi-scale test.
* Mask2Former (any crop): the BEiT-L 640 row (``mask2former_beit_adapter_large_640_160k_ade20k``),
  the only ViT-L Mask2Former row trained from a classification-style pretraining: 100 queries, width 1024.
* Data at crop 640: the 640 rows'; at crop <= 512: the 512 rows' (short side = crop, slide stride
  ``floor(2 * crop / 3)``, ``test.py --aug-test`` scales for multi-scale).
* The injector's gamma starts at 1e-6 for the layer-scaled trunks (DINOv2/v3, as the BEiT rows) and
  at 0 for EVA-02 (no layer scale, as the ViT rows).
"""

from __future__ import annotations

from dataclasses import replace

from models.config import (
    NUM_CLASSES,
    AdapterConfig,
    BackboneConfig,
    FCNConfig,
    OptimizerRecipe,
    PretrainedRecipe,
    Published,
    ScheduleRecipe,
    SegmentorConfig,
    TrunkConfig,
    UperNetConfig,
    even_interaction_indexes,
)
from models.zoo_entries import (
    _AUG_TEST,
    _SETR_MS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _data,
    _layer_decay,
    _m2f_head,
)

# an extension row: no published mIoU, no published #Param, not in the seed table
NOT_PUBLISHED = Published(miou_ss=None, miou_ms=None, params_m=None, in_seed_table=False, extension=True)
# EVA-02's normalisation: OpenAI CLIP mean/std (timm's OPENAI_CLIP_MEAN/STD) in 0-255 pixel units
CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)
_HF = "https://huggingface.co/timm/"

# timm's released weights (its own layout: the names of timm.create_model(...).state_dict())
TIMM_PRETRAINED: dict[str, PretrainedRecipe] = {
    "dinov3": PretrainedRecipe(
        "DINOv3 ViT-L/16 (LVD-1689M)",
        "vit_large_patch16_dinov3.lvd1689m.safetensors",
        _HF + "vit_large_patch16_dinov3.lvd1689m/resolve/main/model.safetensors",
    ),
    "dinov2": PretrainedRecipe(
        "DINOv2 ViT-L/14 (LVD-142M)",
        "vit_large_patch14_dinov2.lvd142m.safetensors",
        _HF + "vit_large_patch14_dinov2.lvd142m/resolve/main/model.safetensors",
    ),
    "eva02": PretrainedRecipe(
        "EVA-02-L/14 448 (MIM M38M, IN-22k + IN-1k fine-tuned)",
        "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k.safetensors",
        _HF + "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k/resolve/main/model.safetensors",
    ),
}

_LARGE = {"embed_dim": 1024, "depth": 24, "num_heads": 16}
# the trunks at ViT-L size; drop_path_rate comes from the recipe
TRUNKS: dict[str, TrunkConfig] = {
    "dinov3": TrunkConfig(
        kind="dinov3",
        img_size=256,  # timm's pretraining size; RoPE has no fixed grid
        drop_path_rate=0.0,
        layer_scale_init=1e-5,
        patch_size=16,
        qkv_bias=False,
        timm_name="vit_large_patch16_dinov3",
        **_LARGE,
    ),
    "dinov2": TrunkConfig(
        kind="dinov2",
        img_size=518,  # pos_embed of the 37 x 37 pretraining grid
        drop_path_rate=0.0,
        layer_scale_init=1e-5,
        patch_size=14,
        timm_name="vit_large_patch14_dinov2",
        **_LARGE,
    ),
    "eva02": TrunkConfig(
        kind="eva02",
        img_size=448,  # pos_embed of the 32 x 32 grid of the 448 fine-tuning
        drop_path_rate=0.0,
        layer_scale_init=0.0,  # no layer scale
        mlp_ratio=4 * 2 / 3,  # SwiGLU hidden 2730
        patch_size=14,
        timm_name="eva02_large_patch14_448",
        **_LARGE,
    ),
}
_NORM = {
    "dinov3": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "eva02": (CLIP_MEAN, CLIP_STD),
}
_TRUNK_NOTES = {
    "dinov3": (
        "trunk: timm vit_large_patch16_dinov3 (patch 16, cls + 4 registers, DINOv3 RoPE built for every "
        "grid, layer scale 1e-5, no qkv bias), ImageNet normalisation as its pretraining",
    ),
    "dinov2": (
        "trunk: timm vit_large_patch14_dinov2 (patch 14, cls token, learned pos_embed at the 518 "
        "pretraining grid resampled bicubically to every grid, layer scale 1e-5), ImageNet normalisation",
        "DINOv2 at 518: the trunk sees each 512 crop resized to 518 (37 x 37 tokens, its pretraining "
        "grid); the adapter keeps the 512 crop (multiples of 32), the two meet by normalised coordinates",
    ),
    "eva02": (
        "trunk: timm eva02_large_patch14_448 (patch 14, cls token, learned pos_embed at 32 x 32 plus RoPE, "
        "SwiGLU MLP, no layer scale), OpenAI CLIP normalisation as its pretraining",
        "crop 448 = 32 x 14 = 14 x 32: the trunk grid (32 x 32) spans the crop exactly, no input resize",
    ),
}
_UPERNET_512 = "upernet_augreg_adapter_large_512_160k_ade20k"
_UPERNET_640 = "upernet_beit_adapter_large_640_160k_ade20k"
_M2F_640 = "mask2former_beit_adapter_large_640_160k_ade20k"


def _recipe(head: str, crop: int) -> tuple[str, OptimizerRecipe, float]:
    """(nearest published row, optimizer, drop path) of a ViT-L extension entry."""
    if head == "upernet" and crop <= 512:
        return _UPERNET_512, _layer_decay(2e-5, 0.05, 0.95, 24), 0.4
    return (_UPERNET_640 if head == "upernet" else _M2F_640), _layer_decay(2e-5, 0.05, 0.9, 24), 0.3


def extension_entry(family: str, head: str, crop: int) -> SegmentorConfig:
    """The ADE20K 160k extension entry of ``family`` (``dinov3``/``dinov2``/``eva02``) with ``head`` at ``crop``."""
    nearest, optimizer, drop_path = _recipe(head, crop)
    trunk = replace(TRUNKS[family], drop_path_rate=drop_path)
    mean, std = _NORM[family]
    large_640 = crop == 640
    name = f"{head}_{family}_adapter_large_{crop}_160k_ade20k"
    data_note = "the 640 rows' data and SETR multi-scale test" if large_640 else "the 512 rows' data"
    if not large_640 and crop != 512:
        data_note += f" at crop {crop} (short side {crop}, stride {2 * crop // 3})"
    return SegmentorConfig(
        name=name,
        reference_config=f"none (extension entry; recipe of {nearest})",
        num_classes=NUM_CLASSES["ade20k"],
        head="upernet" if head == "upernet" else "mask2former",
        backbone=BackboneConfig(
            trunk=trunk,
            adapter=AdapterConfig(
                deform_num_heads=16,
                deform_ratio=0.5,
                interaction_indexes=even_interaction_indexes(trunk.depth),
                injector_init_values=1e-6 if trunk.layer_scale_init > 0 else 0.0,
            ),
            with_cp=True,
        ),
        decode_head=UperNetConfig(channels=512 if nearest == _UPERNET_512 else 1024)
        if head == "upernet"
        else _m2f_head(100, large=True),
        auxiliary_head=FCNConfig() if head == "upernet" else None,
        optimizer=optimizer,
        schedule=ScheduleRecipe(max_iters=160_000, eval_interval=16_000),
        data=_data(
            "ade20k",
            train_scale=(2048, crop),
            test_scale=(2048, crop),
            crop=crop,
            stride=2 * crop // 3,
            samples_per_gpu=2,
            ms=_SETR_MS if large_640 else _AUG_TEST,
            mean=mean,
            std=std,
        ),
        pretrained=TIMM_PRETRAINED[family],
        published=NOT_PUBLISHED,
        notes=(
            "extension: not part of the published reproduction (no published numbers)",
            f"recipe of {nearest} (nearest published row: optimizer, layer decay, drop path, head, "
            f"schedule), with {data_note}",
            *_TRUNK_NOTES[family],
            "pretrained: timm's release of the trunk (its own layout); the trunk authors' own "
            "segmentation recipes are not transcribed here",
        ),
    )


# (family, head, crop): DINOv3-L/16 at 512 and 640, DINOv2-L/14 at 518 (crop 512), EVA-02-L/14 at 448
EXTENSION_ROWS = (
    ("dinov3", "upernet", 512),
    ("dinov3", "mask2former", 512),
    ("dinov3", "upernet", 640),
    ("dinov3", "mask2former", 640),
    ("dinov2", "upernet", 512),
    ("dinov2", "mask2former", 512),
    ("eva02", "upernet", 448),
    ("eva02", "mask2former", 448),
)


def extension_entries() -> list[SegmentorConfig]:
    """Every extension entry, in table order."""
    return [extension_entry(family, head, crop) for family, head, crop in EXTENSION_ROWS]
