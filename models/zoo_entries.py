"""The published entries of the model zoo: the reference recipes transcribed as Python data, torch-free.

Each entry is named after its reference config file without ``_ss``/``_ms`` (single- vs multi-scale is an
evaluation setting) and carries the architecture, the full recipe and the published numbers. Values are
transcribed from ``docs/reference.md`` §R3 (the reference configurations) and the published tables in
``docs/reference.md`` §S; exact reference parameter counts from ``docs/reference.md`` §G3. The 14 rows of the
published tables plus the two COCO-Stuff-164k stages of strategy 2 (docs/reference.md §R2.2) make 16
entries. :mod:`models.zoo` registers them (and the extension entries of :mod:`models.zoo_extensions`).
"""

from __future__ import annotations

from models.config import (
    NUM_CLASSES,
    AdapterConfig,
    BackboneConfig,
    BuiltinDataset,
    DataRecipe,
    EvalRecipe,
    FCNConfig,
    Mask2FormerConfig,
    MultiScaleRecipe,
    OptimizerRecipe,
    PretrainedRecipe,
    Published,
    ScheduleRecipe,
    SegmentorConfig,
    TrainDataRecipe,
    TrunkConfig,
    UperNetConfig,
    even_interaction_indexes,
)

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
AUGREG_MEAN = (127.5, 127.5, 127.5)
AUGREG_STD = (127.5, 127.5, 127.5)
# test.py --aug-test ratios, and the _ms configs' ratios of the BEiT 640 / Pascal rows (docs/reference.md §R2.5)
AUG_TEST_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# BEiT 896 _ms configs: short sides 640 / 768 / 896 of the 896 scale
BEIT_896_MS_RATIOS = (0.7142857142857143, 0.8571428571428571, 1.0)
# BEiTv2 ADE20K 896 _ms config: short sides 800 / 832 / 864 / 896
BEITV2_896_MS_RATIOS = (0.8928571428571429, 0.9285714285714286, 0.9642857142857143, 1.0)
# AugReg-B: DefaultOptimizerConstructor custom_keys in the reference's matching order
# (longest key first, then alphabetical; first match wins): (substring, lr_mult, decay_mult)
AUGREG_B_CUSTOM_KEYS = (
    ("level_embed", 1.0, 0.0),
    ("pos_embed", 1.0, 0.0),
    ("bias", 1.0, 0.0),
    ("head", 10.0, 1.0),
    ("norm", 1.0, 0.0),
)

_DEIT = "https://dl.fbaipublicfiles.com/deit/"
_RELEASES = "https://github.com/czczup/ViT-Adapter/releases/download/"
_BEIT = "https://conversationhub.blob.core.windows.net/beit-share-public/"
_AUGREG_T = (
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.pth"
)
_AUGREG_B = (
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.pth"
)
_AUGREG_L = (
    "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.pth"
)

PRETRAINED: dict[str, PretrainedRecipe] = {
    "deit_tiny": PretrainedRecipe(
        "DeiT-T", "deit_tiny_patch16_224-a1311bcf.pth", _DEIT + "deit_tiny_patch16_224-a1311bcf.pth"
    ),
    "deit_small": PretrainedRecipe(
        "DeiT-S", "deit_small_patch16_224-cd65a155.pth", _DEIT + "deit_small_patch16_224-cd65a155.pth"
    ),
    "deit_base": PretrainedRecipe(
        "DeiT-B", "deit_base_patch16_224-b5f2ef4d.pth", _DEIT + "deit_base_patch16_224-b5f2ef4d.pth"
    ),
    "augreg_tiny": PretrainedRecipe("AugReg-T (IN-22k)", _AUGREG_T, _RELEASES + "v0.3.1/" + _AUGREG_T),
    "augreg_base": PretrainedRecipe("AugReg-B (IN-22k, 384)", _AUGREG_B, _RELEASES + "v0.3.1/" + _AUGREG_B),
    "augreg_large": PretrainedRecipe("AugReg-L (IN-22k, 384)", _AUGREG_L, _RELEASES + "v0.1.6/" + _AUGREG_L),
    "beit_base": PretrainedRecipe(
        "BEiT-B (IN-22k)",
        "beit_base_patch16_224_pt22k_ft22k.pth",
        _BEIT + "beit/beit_base_patch16_224_pt22k_ft22k.pth",
    ),
    "beit_large": PretrainedRecipe(
        "BEiT-L (IN-22k)",
        "beit_large_patch16_224_pt22k_ft22k.pth",
        _BEIT + "beit/beit_large_patch16_224_pt22k_ft22k.pth",
    ),
    "beitv2_large": PretrainedRecipe(
        "BEiTv2-L",
        "beitv2_large_patch16_224_pt1k_ft21k.pth",
        _BEIT + "beitv2/beitv2_large_patch16_224_pt1k_ft21k.pth",
    ),
}

# trunk sizes: (embed_dim, depth, num_heads, deform_num_heads, deform_ratio)
_SIZES = {
    "tiny": (192, 12, 3, 6, 1.0),
    "small": (384, 12, 6, 6, 1.0),
    "base": (768, 12, 12, 12, 0.5),
    "large": (1024, 24, 16, 16, 0.5),
}


def _backbone(kind: str, size: str, *, img_size: int, drop_path_rate: float, with_cp: bool) -> BackboneConfig:
    embed_dim, depth, num_heads, deform_heads, deform_ratio = _SIZES[size]
    is_vit = kind == "vit"
    return BackboneConfig(
        trunk=TrunkConfig(
            kind="vit" if is_vit else "beit",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            layer_scale_init=1.0 if is_vit else 1e-6,
        ),
        adapter=AdapterConfig(
            deform_num_heads=deform_heads,
            deform_ratio=deform_ratio,
            interaction_indexes=even_interaction_indexes(depth),
            injector_init_values=0.0 if is_vit else 1e-6,
        ),
        with_cp=with_cp,
    )


def _layer_decay(lr: float, weight_decay: float, rate: float, num_layers: int) -> OptimizerRecipe:
    return OptimizerRecipe(lr=lr, weight_decay=weight_decay, layer_decay_rate=rate, num_layers=num_layers)


def _data(
    dataset: BuiltinDataset,
    *,
    train_scale: tuple[int, int],
    test_scale: tuple[int, int],
    crop: int,
    stride: int,
    samples_per_gpu: int,
    ms: MultiScaleRecipe | None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    ss_flip: bool = False,
    fp16_test: bool = False,
) -> DataRecipe:
    global_batch = 16  # every reference config (docs/reference.md §R1)
    return DataRecipe(
        dataset=dataset,
        mean=mean,
        std=std,
        train=TrainDataRecipe(
            img_scale=train_scale,
            crop_size=(crop, crop),
            samples_per_gpu=samples_per_gpu,
            gpus=global_batch // samples_per_gpu,
        ),
        eval=EvalRecipe(
            img_scale=test_scale,
            crop_size=(crop, crop),
            stride=(stride, stride),
            ms=ms,
            flip=ss_flip,
            fp16=fp16_test,
        ),
    )


_AUG_TEST = MultiScaleRecipe(ratios=AUG_TEST_RATIOS, flip=True, resize="keep_ratio", source="aug_test")
_SETR_MS = MultiScaleRecipe(
    ratios=AUG_TEST_RATIOS, flip=True, resize="setr", source="ms_config", size_divisor=None
)
_BEIT_896_MS = MultiScaleRecipe(
    ratios=BEIT_896_MS_RATIOS,
    flip=True,
    resize="keep_ratio",
    source="ms_config",
    pad_short_side=896,
    pad_before_normalize=True,
)
_BEITV2_896_MS = MultiScaleRecipe(
    ratios=BEITV2_896_MS_RATIOS,
    flip=True,
    resize="keep_ratio",
    source="ms_config",
    pad_short_side=896,
    pad_before_normalize=False,
)


def _upernet_vit(
    name: str,
    *,
    pretrain: str,
    size: str,
    img_size: int,
    drop_path: float,
    optimizer: OptimizerRecipe,
    published: Published,
    augreg_norm: bool = False,
    with_cp: bool = False,
    fp16_test: bool = True,
) -> SegmentorConfig:
    """DeiT / AugReg rows: UperNet + ViT-Adapter, ADE20K, crop 512, 160k (docs/reference.md §R3)."""
    return SegmentorConfig(
        name=name,
        reference_config=f"segmentation/configs/ade20k/{name}.py",
        num_classes=NUM_CLASSES["ade20k"],
        head="upernet",
        backbone=_backbone("vit", size, img_size=img_size, drop_path_rate=drop_path, with_cp=with_cp),
        decode_head=UperNetConfig(channels=512),
        auxiliary_head=FCNConfig(),
        optimizer=optimizer,
        schedule=ScheduleRecipe(max_iters=160_000, eval_interval=16_000),
        data=_data(
            "ade20k",
            train_scale=(2048, 512),
            test_scale=(2048, 512),
            crop=512,
            stride=341,
            samples_per_gpu=2,
            ms=_AUG_TEST,
            mean=AUGREG_MEAN if augreg_norm else IMAGENET_MEAN,
            std=AUGREG_STD if augreg_norm else IMAGENET_STD,
            fp16_test=fp16_test,
        ),
        pretrained=PRETRAINED[pretrain],
        published=published,
    )


def _m2f_head(num_queries: int, *, large: bool) -> Mask2FormerConfig:
    if large:
        return Mask2FormerConfig(
            feat_channels=1024,
            out_channels=1024,
            num_queries=num_queries,
            encoder_num_heads=32,
            encoder_ffn_channels=4096,
            decoder_num_heads=32,
            decoder_ffn_channels=4096,
            with_cp=True,
        )
    return Mask2FormerConfig(
        feat_channels=256,
        out_channels=256,
        num_queries=num_queries,
        encoder_num_heads=8,
        encoder_ffn_channels=1024,
        decoder_num_heads=8,
        decoder_ffn_channels=2048,
    )


def _beit_entry(
    name: str,
    *,
    folder: str,
    dataset: BuiltinDataset,
    head: str,
    size: str,
    pretrain: str,
    crop: int,
    stride: int,
    iters: int,
    eval_interval: int,
    optimizer: OptimizerRecipe,
    published: Published,
    train_scale: tuple[int, int],
    test_scale: tuple[int, int],
    samples_per_gpu: int,
    ms: MultiScaleRecipe | None,
    num_queries: int = 100,
    ss_flip: bool = False,
    init_from: str | None = None,
    init_from_file: str | None = None,
    init_from_url: str | None = None,
    reference_suffix: str = "_ss",
) -> SegmentorConfig:
    """BEiT / BEiTv2 rows (UperNet or Mask2Former), docs/reference.md §R3."""
    large = size == "large"
    pretrained = PRETRAINED[pretrain]
    if init_from is not None:
        pretrained = PretrainedRecipe(
            pretrained.name,
            pretrained.file,
            pretrained.url,
            init_from=init_from,
            init_from_file=init_from_file,
            init_from_url=init_from_url,
        )
    return SegmentorConfig(
        name=name,
        reference_config=f"segmentation/configs/{folder}/{name}{reference_suffix}.py",
        num_classes=NUM_CLASSES[dataset],
        head="upernet" if head == "upernet" else "mask2former",
        backbone=_backbone("beit", size, img_size=crop, drop_path_rate=0.3 if large else 0.2, with_cp=large),
        decode_head=UperNetConfig(channels=1024)
        if head == "upernet"
        else _m2f_head(num_queries, large=large),
        auxiliary_head=FCNConfig() if head == "upernet" else None,
        optimizer=optimizer,
        schedule=ScheduleRecipe(max_iters=iters, eval_interval=eval_interval),
        data=_data(
            dataset,
            train_scale=train_scale,
            test_scale=test_scale,
            crop=crop,
            stride=stride,
            samples_per_gpu=samples_per_gpu,
            ms=ms,
            ss_flip=ss_flip,
        ),
        pretrained=pretrained,
        published=published,
    )


_LD_L = _layer_decay(2e-5, 0.05, 0.9, 24)
_ADE_640 = {
    "folder": "ade20k",
    "dataset": "ade20k",
    "size": "large",
    "pretrain": "beit_large",
    "crop": 640,
    "stride": 426,
    "iters": 160_000,
    "eval_interval": 16_000,
    "optimizer": _LD_L,
    "train_scale": (2048, 640),
    "test_scale": (2048, 640),
    "samples_per_gpu": 2,
    "ms": _SETR_MS,
}
_ADE_896 = {
    "folder": "ade20k",
    "dataset": "ade20k",
    "head": "mask2former",
    "size": "large",
    "crop": 896,
    "stride": 512,
    "optimizer": _LD_L,
    "train_scale": (3584, 896),
    "test_scale": (3584, 896),
    "samples_per_gpu": 1,
    "num_queries": 200,
    "eval_interval": 8_000,
}
_COCO_896 = {**_ADE_896, "folder": "coco_stuff164k", "dataset": "coco_stuff164k", "iters": 80_000}
_PASCAL_480 = {
    "folder": "pascal_context",
    "dataset": "pascal_context_59",
    "crop": 480,
    "stride": 320,
    "train_scale": (520, 520),
    "test_scale": (4096, 520),
    "samples_per_gpu": 2,
    "ms": _SETR_MS,
}
_COCO_BEIT = "mask2former_beit_adapter_large_896_80k_cocostuff164k"
_COCO_BEITV2 = "mask2former_beitv2_adapter_large_896_80k_cocostuff164k"


def published_entries() -> list[SegmentorConfig]:
    ld_small = _layer_decay(1.2e-4, 0.01, 0.95, 12)
    ld_sb = _layer_decay(6e-5, 0.01, 0.95, 12)
    return [
        _upernet_vit(
            "upernet_deit_adapter_tiny_512_160k_ade20k",
            pretrain="deit_tiny",
            size="tiny",
            img_size=224,
            drop_path=0.1,
            optimizer=ld_small,
            published=Published(42.6, 43.6, 36, 36_062_428),
        ),
        _upernet_vit(
            "upernet_deit_adapter_small_512_160k_ade20k",
            pretrain="deit_small",
            size="small",
            img_size=224,
            drop_path=0.2,
            optimizer=ld_sb,
            published=Published(46.2, 47.1, 58, 57_614_908),
        ),
        _upernet_vit(
            "upernet_deit_adapter_base_512_160k_ade20k",
            pretrain="deit_base",
            size="base",
            img_size=224,
            drop_path=0.3,
            optimizer=ld_sb,
            published=Published(48.8, 49.7, 134, 133_636_876),
        ),
        _upernet_vit(
            "upernet_augreg_adapter_tiny_512_160k_ade20k",
            pretrain="augreg_tiny",
            size="tiny",
            img_size=224,
            drop_path=0.1,
            optimizer=ld_small,
            published=Published(43.9, 44.8, 36, 36_062_428),
        ),
        _upernet_vit(
            "upernet_augreg_adapter_base_512_160k_ade20k",
            pretrain="augreg_base",
            size="base",
            img_size=384,
            drop_path=0.3,
            optimizer=OptimizerRecipe(
                lr=2e-5,
                weight_decay=0.01,
                layer_decay_rate=None,
                num_layers=None,
                custom_keys=AUGREG_B_CUSTOM_KEYS,
            ),
            published=Published(51.9, 52.5, 134, 133_928_716),
            augreg_norm=True,
        ),
        _upernet_vit(
            "upernet_augreg_adapter_large_512_160k_ade20k",
            pretrain="augreg_large",
            size="large",
            img_size=384,
            drop_path=0.4,
            optimizer=_layer_decay(2e-5, 0.05, 0.95, 24),
            published=Published(53.4, 54.4, 364, 363_802_092),
            augreg_norm=True,
            with_cp=True,
            fp16_test=False,
        ),
        _beit_entry(
            "upernet_beit_adapter_large_640_160k_ade20k",
            head="upernet",
            published=Published(58.0, 58.4, 451, 451_919_852),
            **_ADE_640,
        ),
        _beit_entry(
            "mask2former_beit_adapter_large_640_160k_ade20k",
            head="mask2former",
            published=Published(58.3, 59.0, 568, 568_204_887),
            **_ADE_640,
        ),
        _beit_entry(
            "mask2former_beit_adapter_large_896_80k_ade20k",
            pretrain="beit_large",
            iters=80_000,
            ms=_BEIT_896_MS,
            published=Published(59.4, 60.5, 571, 570_744_407),
            init_from=_COCO_BEIT,
            init_from_file="mask2former_beit_adapter_large_896_80k_cocostuff164k.pth.tar",
            init_from_url=_RELEASES + "v0.2.6/mask2former_beit_adapter_large_896_80k_cocostuff164k.zip",
            **_ADE_896,
        ),
        _beit_entry(
            "mask2former_beitv2_adapter_large_896_160k_ade20k",
            pretrain="beitv2_large",
            iters=160_000,
            ms=None,
            published=Published(None, None, 571),
            **_ADE_896,
        ),
        _beit_entry(
            "mask2former_beitv2_adapter_large_896_80k_ade20k",
            pretrain="beitv2_large",
            iters=80_000,
            ms=_BEITV2_896_MS,
            ss_flip=True,
            published=Published(61.2, 61.5, 571, 570_744_407),
            init_from=_COCO_BEITV2,
            init_from_file="mask2former_beitv2_adapter_large_896_80k_cocostuff164k.pth",
            init_from_url=_RELEASES + "v0.3.1/mask2former_beitv2_adapter_large_896_80k_cocostuff164k.zip",
            **_ADE_896,
        ),
        _beit_entry(
            "mask2former_beit_adapter_base_480_40k_pascal_context_59",
            head="mask2former",
            size="base",
            pretrain="beit_base",
            iters=40_000,
            eval_interval=4_000,
            optimizer=_layer_decay(3e-5, 0.05, 0.95, 12),
            published=Published(64.0, 64.4, 120, 120_150_684),
            **_PASCAL_480,
        ),
        _beit_entry(
            "upernet_beit_adapter_large_480_80k_pascal_context_59",
            head="upernet",
            size="large",
            pretrain="beit_large",
            iters=80_000,
            eval_interval=8_000,
            optimizer=_LD_L,
            published=Published(67.0, 67.5, 451, 450_743_350),
            **_PASCAL_480,
        ),
        _beit_entry(
            "mask2former_beit_adapter_large_480_40k_pascal_context_59",
            head="mask2former",
            size="large",
            pretrain="beit_large",
            iters=40_000,
            eval_interval=4_000,
            optimizer=_LD_L,
            # the table prints 568M (the ADE20K number); the reference code counts 567.05M
            published=Published(67.8, 68.2, 568, 567_051_772),
            **_PASCAL_480,
        ),
        _beit_entry(
            _COCO_BEIT,
            pretrain="beit_large",
            ms=_BEIT_896_MS,
            published=Published(51.7, 52.0, 571, in_seed_table=False),
            **_COCO_896,
        ),
        _beit_entry(
            _COCO_BEITV2,
            pretrain="beitv2_large",
            ms=None,
            published=Published(52.3, None, 571, in_seed_table=False),
            **_COCO_896,
        ),
    ]
