"""Extension entries: ViT-Adapter on DINOv3, DINOv2 and EVA-02 trunks built from timm (not published rows)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import models
from models._timm import create_model  # timm through the project's shim (torchvision on CPU torch)
from models.backbone_timm import TimmViTAdapter, trunk_deform_inputs
from models.builder import build_segmentor, count_parameters
from models.checkpoint import load_checkpoint_file
from models.config import BackboneConfig, SegmentorConfig, TrunkConfig, even_interaction_indexes
from models.pretrained import load_pretrained_trunk
from models.trunks.timm_trunks import TimmTrunk
from models.zoo_extensions import EXTENSION_ROWS, TRUNKS, extension_entries
from pipelines.engine.optim import layer_id_for
from rounding import LAMBDA, U32, U64, forward_spreads

EXTENSIONS = [entry.name for entry in extension_entries()]
# one tiny trunk per family (+ DINOv2 with registers): zoo family, timm architecture
FAMILIES = {
    "dinov3": ("dinov3", "vit_large_patch16_dinov3"),
    "dinov2": ("dinov2", "vit_large_patch14_dinov2"),
    "dinov2_reg4": ("dinov2", "vit_large_patch14_reg4_dinov2"),
    "eva02": ("eva02", "eva02_large_patch14_448"),
}
TINY = {"embed_dim": 64, "depth": 4, "num_heads": 2}


def _tiny_trunk(family: str, img_size: int | None = None) -> TrunkConfig:
    kind, timm_name = FAMILIES[family]
    trunk = TRUNKS[kind]
    size = img_size or 4 * trunk.patch_size
    return dataclasses.replace(trunk, timm_name=timm_name, img_size=size, drop_path_rate=0.1, **TINY)


def _tiny_config(name: str, family: str | None = None, *, with_cp: bool = False) -> SegmentorConfig:
    """A tiny variant of extension entry ``name`` by dataclasses.replace (no override machinery)."""
    config = models.get_config(name)
    trunk = _tiny_trunk(family or config.backbone.trunk.kind)
    adapter = dataclasses.replace(
        config.backbone.adapter,
        deform_num_heads=2,
        conv_inplane=16,
        interaction_indexes=even_interaction_indexes(trunk.depth),
    )
    backbone = dataclasses.replace(config.backbone, trunk=trunk, adapter=adapter, with_cp=with_cp)
    if config.head == "upernet":
        head = dataclasses.replace(config.decode_head, channels=32)
        aux = dataclasses.replace(config.auxiliary_head, channels=16)
    else:
        head = dataclasses.replace(
            config.decode_head,
            feat_channels=32,
            out_channels=32,
            num_queries=8,
            encoder_num_heads=2,
            decoder_num_heads=2,
            encoder_ffn_channels=64,
            decoder_ffn_channels=64,
            num_encoder_layers=1,
            num_decoder_layers=2,
            train_num_points=64,
            with_cp=False,
        )
        aux = None
    optimizer = dataclasses.replace(config.optimizer, num_layers=trunk.depth)
    return dataclasses.replace(
        config, backbone=backbone, decode_head=head, auxiliary_head=aux, optimizer=optimizer
    )


def _tiny_backbone(family: str, img_size: int | None = None) -> TimmViTAdapter:
    kind = FAMILIES[family][0]
    config = models.get_config(next(name for name in EXTENSIONS if f"_{kind}_" in name)).backbone
    trunk = _tiny_trunk(family, img_size)
    adapter = dataclasses.replace(
        config.adapter, deform_num_heads=2, conv_inplane=16, interaction_indexes=even_interaction_indexes(4)
    )
    return TimmViTAdapter(BackboneConfig(trunk=trunk, adapter=adapter, with_cp=False))


def _timm_model(family: str, img_size: int, *, dynamic: bool = False) -> torch.nn.Module:
    """timm's own tiny model (its defaults; ``dynamic``: any input size, DINOv3's default anyway)."""
    extra = {"dynamic_img_size": True} if dynamic else {}
    return create_model(FAMILIES[family][1], pretrained=False, img_size=img_size, **TINY, **extra).eval()


def _timm_patch_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) patch tokens after timm's last block (no final norm)."""
    out = model.forward_intermediates(
        x, indices=[len(model.blocks) - 1], norm=False, output_fmt="NLC", intermediates_only=True
    )
    return out[0]


def _assert_timms_tokens(
    backbone: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor, *, float64: bool = True
) -> None:
    """Our trunk computes timm's function: to float64 rounding in float64, to float32 rounding in float32.

    Two correct float32 implementations of one function differ by at most ``2 LAMBDA sigma`` (tests/rounding.py:
    ``sigma``, float32's emulated rounding spread of the tokens, here of our trunk run in float64; the norm of
    the difference is compared), and two float64 ones by that times ``2^-29``. ``float64=False`` where a
    side holds constants made in float32 whatever the model's dtype (EVA-02's rotary tables in timm, built at
    construction): its float64 run then carries float32's rounding of them, and only the float32 check applies.
    """
    ours64, theirs64, x64 = copy.deepcopy(backbone).double(), copy.deepcopy(reference).double(), x.double()
    with torch.no_grad():
        exact, spreads = forward_spreads(lambda: {"tokens": ours64.forward_trunk(x64)}, runs=2)
        sigma = spreads["tokens"]["norm"]
        if float64:
            difference = (exact["tokens"] - _timm_patch_tokens(theirs64, x64)).norm().item()
            assert difference <= 2 * LAMBDA * sigma * U64 / U32, (difference, sigma)
        float32 = (backbone.forward_trunk(x) - _timm_patch_tokens(reference, x)).double().norm().item()
        assert float32 <= 2 * LAMBDA * sigma, (float32, sigma)


# -- the entries ------------------------------------------------------------------------------------


def test_extension_entries_are_registered_apart_from_the_published_rows() -> None:
    assert len(models.list_configs()) == 16 and not set(EXTENSIONS) & set(models.list_configs())
    assert models.list_configs(extensions=True)[16:] == EXTENSIONS
    assert len(EXTENSIONS) == len(EXTENSION_ROWS) == 8
    assert models.list_configs(head="mask2former", dataset="ade20k", extensions=True)[-4:] == EXTENSIONS[1::2]
    for name in EXTENSIONS:
        config = models.get_config(name)
        published = config.published
        assert published.extension and not published.in_seed_table
        assert (published.miou_ss, published.miou_ms, published.params_m) == (None, None, None)
        assert config.notes[0].startswith("extension") and "nearest published row" in config.notes[1]
        assert config.optimizer.num_layers == config.backbone.trunk.depth == 24
        assert config.pretrained.file.endswith(".safetensors") and config.pretrained.url.startswith(
            "https://"
        )
    dinov2 = models.get_config("upernet_dinov2_adapter_large_512_160k_ade20k")
    assert (dinov2.backbone.trunk.img_size, dinov2.backbone.trunk.patch_size) == (518, 14)
    eva = models.get_config("mask2former_eva02_adapter_large_448_160k_ade20k")
    assert eva.data.train.crop_size == (448, 448) and eva.data.mean[0] == pytest.approx(122.7709383)


@pytest.mark.parametrize("name", EXTENSIONS)
def test_every_entry_builds_on_the_meta_device(name: str) -> None:
    config = models.get_config(name)
    count = count_parameters(config)
    # a ViT-L trunk (~304M) + adapter + head: UperNet ~363-450M, Mask2Former ~566M
    low, high = (3.5e8, 4.6e8) if config.head == "upernet" else (5.6e8, 5.7e8)
    assert low < count < high, count


@pytest.mark.parametrize("kind", sorted(TRUNKS))
def test_entry_trunks_are_timms_default_architectures(kind: str) -> None:
    """The full-size trunks have exactly the layout of timm's model, so its released weights fit."""
    with torch.device("meta"):
        ours = TimmTrunk(TRUNKS[kind]).state_dict()
        theirs = create_model(TRUNKS[kind].timm_name, pretrained=False).state_dict()
    unused = ("norm.", "fc_norm.", "head.")
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in theirs.items() if not k.startswith(unused)
    }


def test_configs_list_shows_the_extensions_with_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    assert main(["configs", "list", "--json", "--head", "upernet", "--dataset", "ade20k"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name in EXTENSIONS[::2]:
        assert rows[name]["extension"] and rows[name]["params_published_m"] is None
        assert rows[name]["num_params"] > 3e8
    assert not rows["upernet_deit_adapter_tiny_512_160k_ade20k"]["extension"]
    assert main(["configs", "list", "--json", "--published-only", "--head", "upernet"]) == 0
    assert not any(row["extension"] for row in json.loads(capsys.readouterr().out))


# -- tiny variants: forward and backward ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("upernet_dinov3_adapter_large_512_160k_ade20k", "dinov3"),
        ("upernet_dinov2_adapter_large_512_160k_ade20k", "dinov2"),
        ("upernet_dinov2_adapter_large_512_160k_ade20k", "dinov2_reg4"),
        ("upernet_eva02_adapter_large_448_160k_ade20k", "eva02"),
        ("mask2former_dinov3_adapter_large_640_160k_ade20k", "dinov3"),  # with checkpointing, as the entries
    ],
)
def test_tiny_variant_forward_backward_reaches_every_parameter(name: str, family: str) -> None:
    torch.manual_seed(0)
    model = build_segmentor(_tiny_config(name, family, with_cp=name.startswith("mask2former")))
    with torch.no_grad():  # move zero-initialised weights (injector gamma, attention weights) off zero
        for param in model.parameters():
            param.add_(1e-2 * torch.randn_like(param))
    img = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 150, (2, 64, 64))
    feats = model.backbone(img)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    losses = model.loss(img, labels)
    losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


def test_patch14_grid_meets_the_adapter_pyramid() -> None:
    backbone = _tiny_backbone("dinov2")
    assert backbone.trunk_grid(512, 512) == (37, 37) and backbone.trunk_grid(448, 640) == (32, 46)
    assert backbone.trunk_input(torch.zeros(1, 3, 64, 96)).shape[-2:] == (70, 98)
    assert backbone.trunk_input(torch.zeros(1, 3, 448, 448)).shape[-2:] == (448, 448)  # 14 | 448: as is
    injector, extractor = trunk_deform_inputs(512, 512, (37, 37))
    assert injector.spatial_shapes == [(64, 64), (32, 32), (16, 16)] and extractor.spatial_shapes == [
        (37, 37)
    ]
    torch.testing.assert_close(injector.reference_points[0, 0, 0], torch.tensor([0.5 / 37, 0.5 / 37]))
    assert extractor.reference_points.shape == (1, 64 * 64 + 32 * 32 + 16 * 16, 1, 2)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        backbone(torch.zeros(1, 3, 70, 70))


def test_layer_decay_ids_of_a_timm_trunk() -> None:
    backbone = _tiny_backbone("dinov3")
    num_max_layer = 4 + 2
    ids = {name: layer_id_for(f"backbone.{name}", num_max_layer) for name, _ in backbone.named_parameters()}
    assert ids["cls_token"] == ids["reg_token"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.3.gamma_2"] == 4
    assert ids["level_embed"] == ids["interactions.0.injector.gamma"] == ids["norm4.weight"] == 5
    trunk = [
        n for n in ids if n.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "blocks."))
    ]
    assert all(ids[n] < num_max_layer - 1 for n in trunk)


# -- pretrained trunks: timm's layout and the authors' -------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_state_dict_loads_and_gives_timm_patch_tokens(family: str) -> None:
    torch.manual_seed(0)
    pretrain = 4 * _tiny_trunk(family).patch_size
    reference = _timm_model(family, pretrain)
    state = reference.state_dict()
    backbone = _tiny_backbone(family).eval()
    report, resized = load_pretrained_trunk(backbone, state, FAMILIES[family][0], source="timm")
    assert not resized and not report.mismatched and not report.unexpected
    assert all(k.startswith(("spm.", "interactions.", "level_embed", "up.", "norm")) for k in report.missing)
    assert len(report.loaded) == len([k for k in state if not k.startswith(("norm.", "fc_norm.", "head."))])
    patch = backbone.patch_size
    x = torch.randn(2, 3, pretrain, pretrain)
    sharp = family != "eva02"  # timm builds EVA-02's rotary tables in float32 (see _assert_timms_tokens)
    with torch.no_grad():
        _assert_timms_tokens(backbone, reference, x, float64=sharp)
        dynamic = _timm_model(family, pretrain, dynamic=True)
        dynamic.load_state_dict(state)
        x = torch.randn(2, 3, 6 * patch, 5 * patch)  # another size, not square
        _assert_timms_tokens(backbone, dynamic, x, float64=sharp)


def test_authors_layouts_are_converted_by_timms_filter() -> None:
    torch.manual_seed(0)
    # DINOv3 release names: storage_tokens, ls1/ls2.gamma, a (zero) qkv bias with its mask, rope periods
    reference = _timm_model("dinov3", 64)
    authors = {"mask_token": torch.zeros(1, 64), "rope_embed.periods": torch.ones(8)}
    for key, value in reference.state_dict().items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        authors[key.replace("gamma_2", "ls2.gamma")] = value
    for i in range(4):
        authors[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(192)
        authors[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(192)
    backbone = _tiny_backbone("dinov3").eval()
    report, _ = load_pretrained_trunk(backbone, {"model": authors}, "dinov3")
    assert not report.unexpected and not report.mismatched
    x = torch.randn(1, 3, 80, 96)
    with torch.no_grad():
        _assert_timms_tokens(backbone, reference, x)
    # DINOv2 with registers: register_tokens, a pos_embed with a cls slot, mask_token
    reference = _timm_model("dinov2_reg4", 56)
    state = reference.state_dict()
    authors = {k: v for k, v in state.items() if k not in ("reg_token", "pos_embed")}
    authors["register_tokens"] = state["reg_token"]
    authors["pos_embed"] = torch.cat([torch.zeros(1, 1, 64), state["pos_embed"]], dim=1)
    authors["mask_token"] = torch.zeros(1, 64)
    backbone = _tiny_backbone("dinov2_reg4").eval()
    report, resized = load_pretrained_trunk(backbone, authors, "dinov2")
    assert not report.unexpected and not report.mismatched and not resized
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        _assert_timms_tokens(backbone, reference, x)


def test_another_pretraining_grid_is_resampled_and_a_wrong_family_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _timm_model("dinov2", 56).state_dict()  # 4 x 4 grid
    path = tmp_path / "dinov2.safetensors"
    save_file(state, str(path))
    backbone = _tiny_backbone("dinov2", img_size=70)  # 5 x 5 grid
    report, resized = load_pretrained_trunk(backbone, load_checkpoint_file(path), "dinov2", source=str(path))
    assert resized == ["pos_embed"] and backbone.pos_embed.shape == (1, 26, 64) and not report.mismatched
    with pytest.raises(ValueError, match="do not fit the vit_large_patch16_dinov3 trunk"):
        load_pretrained_trunk(_tiny_backbone("dinov3"), state, "dinov3")


def test_missing_pretrained_file_names_the_file_and_where_to_put_it(tmp_path: Path) -> None:
    from pipelines.runs.weights import WeightsNotFoundError, resolve_weights

    recipe = models.get_config("upernet_dinov3_adapter_large_640_160k_ade20k").pretrained
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(recipe.file, recipe.url, weights_dir=tmp_path, download=False)
    message = str(err.value)
    assert recipe.file in message and str(tmp_path / recipe.file) in message and recipe.url in message


# -- training through the command ----------------------------------------------------------------


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.prepare import prepare_dataset
    from data.synthetic import synthesize

    root = tmp_path_factory.mktemp("ade_twin")
    report = synthesize(
        "ade20k", root / "raw", num_train=4, num_val=2, seed=3, min_size=64, max_size=96, num_classes_used=4
    )
    prepare_dataset("ade20k", report.root, root / "prepared")
    return root / "prepared"


@pytest.mark.parametrize(
    "name",
    [
        "upernet_dinov3_adapter_large_512_160k_ade20k",
        "mask2former_dinov2_adapter_large_512_160k_ade20k",
        "upernet_eva02_adapter_large_448_160k_ade20k",
    ],
)
def test_tiny_variant_trains_through_the_train_command(twin: Path, tmp_path: Path, name: str) -> None:
    from pipelines.cli import main

    work = tmp_path / "run"
    args = ["train", "--no-tracking", name, "--data", str(twin), "--work-dir", str(work), "--preset", "tiny"]
    args += ["--pretrained", "none", "--num-workers", "0", "--no-progress", "--max-iters", "2"]
    args += ["--batch-size", "2", "--global-batch", "2", "--log-interval", "1"]
    args += ["--eval-interval", "2", "--eval-limit", "1"]
    assert main(args) == 0
    state = load_checkpoint_file(sorted(work.glob("iter_*.pth"))[-1])["state_dict"]
    assert "backbone.cls_token" in state and "backbone.blocks.3.norm1.weight" in state
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert (work / "best_mIoU.pth").is_file()  # evaluated through the slide inference
