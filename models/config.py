"""Typed, torch-free configuration of a ViT-Adapter segmentor and its reference recipe.

Every zoo entry (:mod:`models.zoo`) is one :class:`SegmentorConfig`. The field values are
transcribed from ``docs/reference.md`` §R3 (the reference configs with inheritance
resolved); field docstrings name the reference option they stand for. Nothing here imports torch,
so listing and validating configs is instant.

Overrides by dotted path, their checks and the fields derived from others live in
:mod:`models.overrides`; a field's range (``field(metadata=bounds(gt=0))``, :func:`models.values.bounds`) is
checked for every value a user sets; :func:`validate` holds the cross-field rules every config must satisfy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from models.values import bounds

TrunkKind = Literal["vit", "beit", "dinov3", "dinov2", "eva02"]
HeadKind = Literal["upernet", "mask2former"]
BuiltinDataset = Literal["ade20k", "coco_stuff164k", "pascal_context_59"]
# a built-in dataset, or a user's dataset card in use (register_dataset): checked by validate, not by its type
DatasetName = str
DeformAttnBackend = Literal["auto", "pytorch", "triton"]
IGNORE_INDEX = 255
NUM_INTERACTIONS = 4
# classes of each dataset's evaluation protocol (docs/reference.md §D)
NUM_CLASSES: dict[str, int] = {"ade20k": 150, "coco_stuff164k": 171, "pascal_context_59": 59}
# the users' dataset cards in use in this process: name -> number of classes (register_dataset)
_CARD_CLASSES: dict[str, int] = {}


def register_dataset(name: str, num_classes: int) -> None:
    """Make a user's dataset card known to :func:`validate` (``data.dataset`` = ``name`` with ``num_classes``).

    ``pipelines`` calls it whenever it meets a card: in the card file, in its shards' index, in a checkpoint
    trained on it; ``models`` never reads cards itself (it imports nothing of ``data``).

    Raises:
        ValueError: a built-in dataset's name or a class count outside 1..255.
    """
    if name in NUM_CLASSES:
        raise ValueError(f"dataset {name!r} is built in; a dataset card needs another name")
    if not 1 <= num_classes <= 255:
        raise ValueError(f"dataset {name!r}: {num_classes} classes (expected 1..255)")
    _CARD_CLASSES[name] = num_classes


def dataset_classes(name: str) -> int | None:
    """The number of classes of a built-in dataset or a registered card, None when neither."""
    return NUM_CLASSES.get(name, _CARD_CLASSES.get(name))


@dataclass(frozen=True)
class TrunkConfig:
    """The plain ViT (DeiT/AugReg) or BEiT (BEiT/BEiTv2) trunk (docs/reference.md §R2.1).

    Attributes:
        kind: ``"vit"``: timm-style ViT, no cls token, learned ``pos_embed`` (with its cls slot)
            resized bicubically to the patch grid at every forward, layer scale ``gamma1/gamma2``.
            ``"beit"``: BEiT blocks with q/v bias, per-block relative position bias, cls token,
            layer scale ``gamma_1/gamma_2``, no absolute position embedding.
        img_size: ViT: the resolution ``pos_embed`` was trained at (reference ``img_size`` =
            ``pretrain_size``). BEiT: the only accepted input size (relative-position tables).
        layer_scale_init: initial value of the blocks' layer-scale vectors (1.0 ViT, 1e-6 BEiT).
        timm_name: kinds ``"dinov3"``, ``"dinov2"``, ``"eva02"`` (extension entries only,
            :mod:`models.trunks.timm_trunks`): the timm architecture the trunk is built from (e.g.
            ``"vit_large_patch16_dinov3"``), given ``embed_dim``, ``depth``, ``num_heads``,
            ``mlp_ratio``, ``qkv_bias``, ``patch_size``, ``img_size`` (the pretraining resolution) and
            ``layer_scale_init`` (0: no layer scale). None for ``"vit"``/``"beit"``.
    """

    kind: TrunkKind
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int
    drop_path_rate: float = field(metadata=bounds(min=0, lt=1))
    layer_scale_init: float = field(metadata=bounds(min=0))
    mlp_ratio: float = field(default=4.0, metadata=bounds(gt=0))
    patch_size: int = 16
    qkv_bias: bool = True
    timm_name: str | None = None


@dataclass(frozen=True)
class AdapterConfig:
    """The ViT-Adapter modules around the trunk (docs/reference.md §P3).

    Attributes:
        deform_num_heads: heads of every MSDeformAttn in the adapter.
        deform_ratio: value dimension of MSDeformAttn relative to ``embed_dim``.
        interaction_indexes: inclusive (first, last) trunk block of each of the 4 interactions.
        injector_init_values: initial value of each Injector's ``gamma`` (0 ViT, 1e-6 BEiT).
        conv_inplane: width of the SpatialPriorModule stem (64/128/256/256 channels per level).
    """

    deform_num_heads: int
    deform_ratio: float = field(metadata=bounds(gt=0))
    interaction_indexes: tuple[tuple[int, int], ...]
    injector_init_values: float = field(metadata=bounds(min=0))
    conv_inplane: int = 64
    n_points: int = 4
    cffn_ratio: float = field(default=0.25, metadata=bounds(gt=0))
    with_cffn: bool = True
    add_vit_feature: bool = True
    use_extra_extractor: bool = True


@dataclass(frozen=True)
class BackboneConfig:
    """ViT-Adapter backbone = trunk + adapter. ``with_cp``: gradient checkpointing of the blocks."""

    trunk: TrunkConfig
    adapter: AdapterConfig
    with_cp: bool = False


@dataclass(frozen=True)
class UperNetConfig:
    """mmseg ``UPerHead`` on all four backbone outputs (docs/reference.md §P4)."""

    channels: int
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    dropout_ratio: float = field(default=0.1, metadata=bounds(min=0, lt=1))
    loss_weight: float = field(default=1.0, metadata=bounds(min=0))


@dataclass(frozen=True)
class FCNConfig:
    """mmseg ``FCNHead`` auxiliary head on backbone output ``in_index`` (stride 16)."""

    channels: int = 256
    in_index: int = 2
    num_convs: int = 1
    kernel_size: int = 3
    concat_input: bool = False
    dropout_ratio: float = field(default=0.1, metadata=bounds(min=0, lt=1))
    loss_weight: float = field(default=0.4, metadata=bounds(min=0))


@dataclass(frozen=True)
class Mask2FormerConfig:
    """Mask2Former head (pixel decoder + masked-attention decoder + criterion), docs/reference.md §R2.4."""

    feat_channels: int
    out_channels: int
    num_queries: int
    encoder_num_heads: int
    encoder_ffn_channels: int
    decoder_num_heads: int
    decoder_ffn_channels: int
    num_encoder_layers: int = 6
    num_decoder_layers: int = 9
    num_feature_levels: int = 3
    with_cp: bool = False
    cls_loss_weight: float = field(default=2.0, metadata=bounds(min=0))
    mask_loss_weight: float = field(default=5.0, metadata=bounds(min=0))
    dice_loss_weight: float = field(default=5.0, metadata=bounds(min=0))
    no_object_weight: float = field(default=0.1, metadata=bounds(min=0))
    train_num_points: int = 12544
    oversample_ratio: float = field(default=3.0, metadata=bounds(min=1))
    importance_sample_ratio: float = field(default=0.75, metadata=bounds(min=0, max=1))


@dataclass(frozen=True)
class OptimizerRecipe:
    """AdamW with layer-wise lr decay (docs/reference.md §R2.3) or, when ``layer_decay_rate`` is None,
    mmcv's DefaultOptimizerConstructor with ``custom_keys`` (the AugReg-B exception).

    Attributes:
        custom_keys: (name substring, lr_mult, decay_mult) in the reference's matching order
            (longest key first, then alphabetical; first match wins).
    """

    lr: float = field(metadata=bounds(gt=0))
    weight_decay: float = field(metadata=bounds(min=0))
    layer_decay_rate: float | None = field(metadata=bounds(gt=0, max=1))
    num_layers: int | None
    custom_keys: tuple[tuple[str, float, float], ...] = ()
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=bounds(min=0, lt=1))
    eps: float = field(default=1e-8, metadata=bounds(gt=0))
    grad_clip: float | None = field(default=None, metadata=bounds(gt=0))


@dataclass(frozen=True)
class ScheduleRecipe:
    """Iteration-based poly schedule with linear warmup, and the runtime intervals (docs/reference.md §R2.3, §R2.6)."""

    max_iters: int
    eval_interval: int
    warmup_iters: int = 1500
    warmup_ratio: float = field(default=1e-6, metadata=bounds(gt=0, max=1))
    power: float = field(default=1.0, metadata=bounds(min=0))
    min_lr: float = field(default=0.0, metadata=bounds(min=0))
    checkpoint_interval: int = 1000
    max_keep_checkpoints: int = 1
    log_interval: int = 50


@dataclass(frozen=True)
class TrainDataRecipe:
    """The training pipeline (docs/reference.md §R3, each config's "Train pipeline").

    Attributes:
        img_scale: (long, short) bound of the keep-ratio random rescale, scaled by U(ratio_range).
        crop_size: (height, width) of the random crop and of the padding.
        samples_per_gpu, gpus: the reference batch layout; the global batch is their product.
    """

    img_scale: tuple[int, int]
    crop_size: tuple[int, int]
    samples_per_gpu: int
    gpus: int
    ratio_range: tuple[float, float] = field(default=(0.5, 2.0), metadata=bounds(gt=0))
    cat_max_ratio: float = field(default=0.75, metadata=bounds(gt=0, max=1))
    flip_prob: float = field(default=0.5, metadata=bounds(min=0, max=1))

    @property
    def global_batch(self) -> int:
        return self.samples_per_gpu * self.gpus


@dataclass(frozen=True)
class MultiScaleRecipe:
    """Multi-scale + flip test pipeline (docs/reference.md §R2.5 and §R3).

    Attributes:
        ratios: multipliers of the single-scale ``img_scale``.
        resize: ``"keep_ratio"``: mmcv keep-ratio resize to ``(int(long*r), int(short*r))`` then
            ResizeToMultiple(``size_divisor``); ``"setr"``: SETR_Resize, short side
            ``max(int(short*r), crop)`` with no long-side cap and no ResizeToMultiple.
        pad_short_side: PadShortSide target size, or None.
        pad_before_normalize: where PadShortSide sits (raw 0 before, normalised 0 after).
        source: ``"ms_config"`` (a ``_ms`` config exists) or ``"aug_test"`` (test.py --aug-test).
    """

    ratios: tuple[float, ...] = field(metadata=bounds(gt=0))
    flip: bool
    resize: Literal["keep_ratio", "setr"]
    source: Literal["ms_config", "aug_test"]
    size_divisor: int | None = 32
    pad_short_side: int | None = None
    pad_before_normalize: bool = False


@dataclass(frozen=True)
class EvalRecipe:
    """Single-scale test pipeline, inference mode and multi-scale settings.

    Attributes:
        img_scale: (long, short) of the keep-ratio test resize.
        flip: whether the "single-scale" evaluation adds a flipped pass (True only for the
            BEiTv2 ADE20K 80k config, docs/reference.md §R4).
        ms: the multi-scale recipe, None where the reference has none.
        fp16: the reference test.py ran this config under fp16 autocast (docs/reference.md §R2.6).
    """

    img_scale: tuple[int, int]
    crop_size: tuple[int, int]
    stride: tuple[int, int]
    ms: MultiScaleRecipe | None
    mode: Literal["slide", "whole"] = "slide"
    size_divisor: int = 32
    flip: bool = False
    fp16: bool = False


@dataclass(frozen=True)
class DataRecipe:
    """Dataset, normalisation and pipelines of a config."""

    dataset: DatasetName
    mean: tuple[float, float, float] = field(metadata=bounds(min=0, max=255))
    std: tuple[float, float, float] = field(metadata=bounds(gt=0))
    train: TrainDataRecipe
    eval: EvalRecipe
    to_rgb: bool = True


@dataclass(frozen=True)
class PretrainedRecipe:
    """Weights a training run starts from (docs/reference.md §R2.2).

    Attributes:
        name: the pretraining as the README names it (e.g. ``"DeiT-T"``).
        file: the file name the reference expects under ``pretrained/``.
        url: where the file is published.
        init_from: zoo name of the stage whose checkpoint initialises this one (strategy 2), or None.
        init_from_file, init_from_url: the released checkpoint of that stage.
    """

    name: str
    file: str
    url: str
    init_from: str | None = None
    init_from_file: str | None = None
    init_from_url: str | None = None


@dataclass(frozen=True)
class Published:
    """Published results of the row (``docs/reference.md`` §S) and the reference's own parameter count.

    Attributes:
        miou_ss, miou_ms: README mIoU, None where the README gives none.
        params_m: the README's #Param in millions (rounded as printed).
        reference_num_params: exact count of the reference code (docs/reference.md §G3), None where
            unavailable (the COCO-Stuff stages and the BEiTv2 160k config have no manifest).
        extension: an entry beyond the published rows (:mod:`models.zoo_extensions`): nothing was
            published for it, so ``miou_ss``/``miou_ms``/``params_m`` are None and ``in_seed_table`` False.
    """

    miou_ss: float | None
    miou_ms: float | None
    params_m: int | None
    reference_num_params: int | None = None
    in_seed_table: bool = True
    extension: bool = False

    def miou(self, mode: Literal["ss", "ms"]) -> float | None:
        """The published mIoU of single-scale (``ss``) or multi-scale + flip (``ms``) evaluation."""
        if mode not in ("ss", "ms"):
            raise ValueError(f"evaluation mode must be 'ss' or 'ms', got {mode!r}")
        return self.miou_ss if mode == "ss" else self.miou_ms


@dataclass(frozen=True)
class SegmentorConfig:
    """One zoo entry: architecture, recipe and published numbers of one reference config."""

    name: str
    reference_config: str
    num_classes: int
    head: HeadKind
    backbone: BackboneConfig
    decode_head: UperNetConfig | Mask2FormerConfig
    auxiliary_head: FCNConfig | None
    optimizer: OptimizerRecipe
    schedule: ScheduleRecipe
    data: DataRecipe
    pretrained: PretrainedRecipe
    published: Published
    align_corners: bool = False
    ignore_index: int = IGNORE_INDEX
    notes: tuple[str, ...] = field(default_factory=tuple)
    # which multi-scale deformable attention runs (cuda_ops); changes speed, never the weights
    deform_attn_backend: DeformAttnBackend = "auto"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the whole config."""
        return dataclasses.asdict(self)


def even_interaction_indexes(depth: int) -> tuple[tuple[int, int], ...]:
    """Split ``depth`` blocks into the 4 equal interaction groups the reference uses."""
    if depth % NUM_INTERACTIONS:
        raise ValueError(
            f"depth={depth} cannot be split into {NUM_INTERACTIONS} equal interactions; "
            "give interaction_indexes explicitly"
        )
    step = depth // NUM_INTERACTIONS
    return tuple((i * step, (i + 1) * step - 1) for i in range(NUM_INTERACTIONS))


def validate(config: SegmentorConfig) -> None:
    """Check the cross-field rules of a config; raises ValueError naming the offending value."""
    trunk, adapter = config.backbone.trunk, config.backbone.adapter
    if trunk.embed_dim % trunk.num_heads:
        raise ValueError(
            f"{config.name}: embed_dim={trunk.embed_dim} is not divisible by num_heads={trunk.num_heads}"
        )
    value_dim = int(trunk.embed_dim * adapter.deform_ratio)
    if value_dim % adapter.deform_num_heads:
        raise ValueError(
            f"{config.name}: deform value dim {value_dim} (embed_dim*deform_ratio) is not divisible by "
            f"deform_num_heads={adapter.deform_num_heads}"
        )
    if len(adapter.interaction_indexes) != NUM_INTERACTIONS:
        raise ValueError(f"{config.name}: interaction_indexes must have {NUM_INTERACTIONS} groups")
    expected_first = 0
    for first, last in adapter.interaction_indexes:
        if first != expected_first or last < first:
            raise ValueError(
                f"{config.name}: interaction_indexes {adapter.interaction_indexes} must tile the blocks"
            )
        expected_first = last + 1
    if expected_first != trunk.depth:
        raise ValueError(
            f"{config.name}: interaction_indexes {adapter.interaction_indexes} do not cover depth={trunk.depth}"
        )
    if trunk.img_size % trunk.patch_size:
        raise ValueError(
            f"{config.name}: img_size={trunk.img_size} is not a multiple of patch_size={trunk.patch_size}"
        )
    expected_classes = dataset_classes(config.data.dataset)
    if expected_classes is None:
        raise ValueError(
            f"{config.name}: data.dataset={config.data.dataset!r}: allowed values are "
            f"{', '.join(repr(name) for name in NUM_CLASSES)} or a dataset card in use "
            f"({', '.join(_CARD_CLASSES) or 'none'}; `vitadapter train NAME --data SHARDS` of a card's shards "
            "sets it)"
        )
    if config.num_classes != expected_classes:
        raise ValueError(
            f"{config.name}: num_classes={config.num_classes} does not match data.dataset="
            f"{config.data.dataset!r}, which has {expected_classes} classes"
        )
    train_crop, eval_crop = config.data.train.crop_size, config.data.eval.crop_size
    if min(train_crop) < 1 or min(eval_crop) < 1:
        raise ValueError(f"{config.name}: crop sizes must be positive, got {train_crop} / {eval_crop}")
    if config.data.eval.mode == "slide" and not all(
        0 < s <= c for s, c in zip(config.data.eval.stride, eval_crop, strict=True)
    ):
        raise ValueError(
            f"{config.name}: data.eval.stride={config.data.eval.stride} must be positive and at most "
            f"data.eval.crop_size={eval_crop}"
        )
    if (
        trunk.kind == "beit"
        and (train_crop[0], train_crop[1], eval_crop[0], eval_crop[1]) != (trunk.img_size,) * 4
    ):
        raise ValueError(
            f"{config.name}: a BEiT trunk takes only square {trunk.img_size} inputs (backbone.trunk.img_size="
            f"{trunk.img_size}), but data.train.crop_size={train_crop} and data.eval.crop_size={eval_crop}"
        )
    head_type = UperNetConfig if config.head == "upernet" else Mask2FormerConfig
    if not isinstance(config.decode_head, head_type):
        raise ValueError(f"{config.name}: head {config.head!r} needs a {head_type.__name__}")
