"""params.yaml is loaded strictly; dvc.yaml, params.yaml and the zoo agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import models
from micro_params import MICRO, micro_params, write_params
from pipelines.cli import main
from pipelines.config.params import Params, ParamsError, load_params, parse_params
from pipelines.orchestration.dvcgraph import build_dvc_graph, render_dvc_yaml

REPO = Path(__file__).resolve().parents[2]


def test_micro_params_load() -> None:
    params = parse_params(MICRO)
    assert params.run("tiny").train.max_iters == 4 and params.run("tiny").dataset == "ade20k"
    assert params.datasets["ade20k"].num_classes_used == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trackingg": {}}, "unknown key 'trackingg'"),
        ({"tracking": {"uri": 3}}, r"tracking\.uri=3: expected str"),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "train": {"max_iters": "many"}}}},
            r"runs\.tiny\.train\.max_iters",
        ),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "train": {"precision": "fp8"}}}},
            r"runs\.tiny\.train\.precision='fp8': allowed values are 'fp32', 'bf16', 'fp16'",
        ),
        ({"runs": {"tiny": {**MICRO["runs"]["tiny"], "epochs": 3}}}, r"runs\.tiny: unknown key 'epochs'"),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "config": "upernet_nope"}}},
            r"runs\.tiny\.config: unknown zoo entry 'upernet_nope'",
        ),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "overrides": {"embed_dimm": 3}}}},
            r"runs\.tiny\.overrides: override 'embed_dimm' of \w+: no such field",
        ),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "overrides": {"mode": "sliding"}}}},
            r"runs\.tiny\.overrides: override 'mode' .* is not a shorthand: write the full path \(data\.eval\.mode\)",
        ),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "overrides": {"data.eval.mode": "sliding"}}}},
            r"override data\.eval\.mode='sliding': allowed values are 'slide', 'whole'",
        ),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "overrides": {"channels": 16}}}},
            r"'channels' .* is ambiguous: write the full path \(decode_head\.channels, auxiliary_head\.channels\)",
        ),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "preset": "huge"}}},
            r"runs\.tiny\.overrides: unknown preset 'huge'; known presets: tiny",
        ),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "train": {"max_iters": 0}}}},
            r"runs\.tiny\.train\.max_iters: 0 is out of range \(at least 1; leave it unset for the recipe's\)",
        ),
        (
            {"runs": {"tiny": {**MICRO["runs"]["tiny"], "train": {"batch_size": -2}}}},
            r"runs\.tiny\.train\.batch_size: -2 is out of range",
        ),
        ({"datasets": {"cityscapes": {}}}, r"datasets\.cityscapes: unknown dataset"),
        ({"datasets": {"ade20k": {"source": "raw"}}}, r"source 'raw' needs raw"),
        ({"datasets": {}}, r"runs\.tiny trains on 'ade20k', which datasets does not list"),
        (
            {
                "runs": {
                    "a": {**MICRO["runs"]["tiny"], "init_from": "b"},
                    "b": {**MICRO["runs"]["tiny"], "init_from": "a"},
                }
            },
            "cycle",
        ),
    ],
)
def test_bad_params_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    path = write_params(tmp_path / "params.yaml", micro_params(**change))
    with pytest.raises(ParamsError, match=message):
        load_params(path)


@pytest.mark.parametrize(
    ("written", "expected"),
    [("6e-5", 6e-5), ("1e-4", 1e-4), ("1e12", 1e12), ("1.0e12", 1e12), ("1E3", 1e3), (".5", 0.5), ("2", 2.0)],
)
def test_params_yaml_takes_numbers_as_people_write_them(
    tmp_path: Path, written: str, expected: float
) -> None:
    """YAML 1.1 reads ``6e-5`` (no dot, no signed exponent) as a string: a float field takes it all the same."""
    text = yaml.safe_dump(micro_params(), sort_keys=False).replace(
        "optimizer.lr: 0.001", f"optimizer.lr: {written}"
    )
    assert f"optimizer.lr: {written}\n" in text
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    lr = params.run("tiny").model_config().optimizer.lr
    assert lr == expected and type(lr) is float


@pytest.mark.parametrize("written", [".inf", "inf", "-.inf", ".nan", "nan", "0"])
def test_params_yaml_refuses_a_learning_rate_out_of_its_range(tmp_path: Path, written: str) -> None:
    text = yaml.safe_dump(micro_params(), sort_keys=False).replace(
        "optimizer.lr: 0.001", f"optimizer.lr: {written}"
    )
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(
        ParamsError, match=r"runs\.tiny\.overrides: override optimizer\.lr: \S+ is out of range"
    ):
        load_params(tmp_path / "params.yaml")


def test_missing_and_unreadable_params(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml does not exist"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("runs: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_unknown_run_is_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_params(tmp_path / "params.yaml", micro_params())
    assert main(["pipeline", "train", "nope", "--params", str(path)]) == 1
    assert "unknown run 'nope'" in caplog.text


def test_chain_order_and_dvc_dependencies() -> None:
    chain = micro_params()
    chain["runs"] = {
        "second": {**MICRO["runs"]["tiny"], "init_from": "first"},
        "first": MICRO["runs"]["tiny"],
    }
    params = parse_params(chain)
    assert params.run_order() == ["first", "second"]
    stages = build_dvc_graph(params)["stages"]
    names = list(stages)
    assert names.index("train_first") < names.index("train_second") < names.index("report")
    assert "artifacts/runs/first" in stages["train_second"]["deps"]
    assert stages["report"]["deps"] == ["metrics/first/eval_ss.json", "metrics/second/eval_ss.json"]


def test_one_evaluation_stage_per_run_gives_every_mode_its_own_outputs() -> None:
    both = micro_params()
    both["runs"]["tiny"]["eval"] = {**both["runs"]["tiny"].get("eval", {}), "modes": ["ss", "ms"]}
    stages = build_dvc_graph(parse_params(both))["stages"]
    assert not any(name.startswith("evaluate_tiny_") for name in stages)
    stage = stages["evaluate_tiny"]
    assert stage["cmd"] == "vitadapter pipeline evaluate tiny --mode ss ms --params params.yaml"
    assert stage["outs"] == ["artifacts/reports/tiny/overlays_ss", "artifacts/reports/tiny/overlays_ms"]
    assert [next(iter(m)) for m in stage["metrics"]] == [
        "metrics/tiny/eval_ss.json",
        "metrics/tiny/eval_ms.json",
    ]
    assert stages["report"]["deps"] == ["metrics/tiny/eval_ss.json", "metrics/tiny/eval_ms.json"]


def test_committed_params_dvc_yaml_and_zoo_agree() -> None:
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(params, raw=raw)
    for name, run in params.runs.items():
        assert run.model_config().data.dataset in params.datasets, name
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {f"train_{n}" for n in params.runs} <= set(dvc)
    assert {f"prepare_{d}" for d in params.datasets} <= set(dvc)


# the `dvc exp run -S ...` settings README.md gives for reproducing mask2former_beit_adapter_large_896_80k_ade20k
README_ROW_SETTINGS = {
    "datasets.coco_stuff164k.source": "raw",
    "datasets.coco_stuff164k.raw": "/data/coco_stuff164k",
    "datasets.ade20k.source": "raw",
    "datasets.ade20k.raw": "/data/ade",
    "runs.coco_stage.preset": "null",
    "runs.ade_stage.preset": "null",
    "runs.coco_stage.overrides": "{}",
    "runs.ade_stage.overrides": "{}",
    "runs.coco_stage.train": "{pretrained: auto, num_workers: 4}",
    "runs.ade_stage.train": "{pretrained: auto, num_workers: 4}",
    "runs.coco_stage.eval": "{modes: [ss, ms]}",
    "runs.ade_stage.eval": "{modes: [ss, ms]}",
    "runs.coco_stage.gpus": "8",
    "runs.coco_stage.nodes": "2",
    "runs.ade_stage.gpus": "8",
    "runs.ade_stage.nodes": "2",
}


def _readme_row_params() -> Params:
    """params.yaml with README_ROW_SETTINGS applied, as `dvc exp run -S key=value` applies them."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in README_ROW_SETTINGS.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return parse_params(raw)


def test_readme_row_reproduction_gives_the_published_recipe() -> None:
    readme = (REPO / "README.md").read_text()
    for key, value in README_ROW_SETTINGS.items():
        assert f"{key}={value}" in readme or f"'{key}={value}'" in readme, key
    params = _readme_row_params()
    from pipelines.engine.plan import resolve_plan

    for name, zoo_name in (
        ("coco_stage", "mask2former_beit_adapter_large_896_80k_cocostuff164k"),
        ("ade_stage", "mask2former_beit_adapter_large_896_80k_ade20k"),
    ):
        run = params.run(name)
        assert run.config == zoo_name
        assert run.model_config() == models.get_config(zoo_name)  # the published recipe
        plan = resolve_plan(
            run.model_config(), run.train, world_size=run.gpus * run.nodes, work_dir=Path("unused")
        )
        assert (plan.batch.per_process, plan.batch.accumulation, plan.batch.global_batch) == (1, 1, 16)
        assert plan.max_iters == 80_000 and plan.optimizer == models.get_config(zoo_name).optimizer
        assert run.train.pretrained == "auto" and run.train.max_iters is None  # the recipe's 80k iterations
    assert params.run("ade_stage").init_from == "coco_stage"
    assert params.run_order() == ["coco_stage", "ade_stage"]


def _recipe_diffs(params: Params, *, official: bool) -> dict[str, list[str]]:
    """The recipe diffs (deviation keys) of every run's training and SS/MS evaluations, as the stages record
    them, with official data and weights (``official``) or as the demo has them (synthetic twins, none)."""
    from pipelines.engine.evaluator import resolve_precision
    from pipelines.engine.plan import resolve_plan
    from pipelines.runs import recipe_diff

    diffs, trained = {}, {}
    for name in params.run_order():
        run = params.run(name)
        config = run.model_config()
        gpus = run.gpus * run.nodes
        plan = resolve_plan(
            config, run.train, world_size=max(gpus, 1), work_dir=Path("unused"), bn_spans_processes=gpus > 0
        )
        if official:
            data = {"kind": "official", "archives": [{"file": "an official archive", "sha256": "0" * 64}]}
            weights = {"file": f"artifacts/pretrained/{config.pretrained.file}", "sha256": "1" * 64}
        else:
            data, weights = {"kind": "synthetic", "written_by": "vitadapter data synthesize"}, None
        start = (
            {"file": f"{name}/best_mIoU.pth", "recipe_diff": trained[run.init_from]}
            if run.init_from in trained
            else None
        )
        training = recipe_diff.training_diff(
            config, plan, pretrained=weights, init_from=start, dataset=data, preset=run.preset
        )
        trained[name] = training.to_dict()
        diffs[name] = training.keys
        for mode in run.eval.modes:
            device = torch.device("cuda" if gpus else "cpu")
            evaluation = recipe_diff.evaluation_diff(
                config,
                mode=mode,
                precision=resolve_precision(config, run.eval.precision, device),
                tf32=run.eval.tf32,
                inference=config.data.eval.mode,
                num_images=run.eval.limit or 2000,
                limit=run.eval.limit,
                dataset=data,
                training=trained[name],
            )
            diffs[f"{name}/{mode}"] = evaluation.keys
    return diffs


def test_readme_row_reproduction_has_an_empty_recipe_diff() -> None:
    diffs = _recipe_diffs(_readme_row_params(), official=True)
    assert set(diffs) == {
        "coco_stage",
        "coco_stage/ss",
        "coco_stage/ms",
        "ade_stage",
        "ade_stage/ss",
        "ade_stage/ms",
    }
    assert all(keys == [] for keys in diffs.values()), diffs


def test_the_demo_names_each_of_its_deviations() -> None:
    diffs = _recipe_diffs(load_params(REPO / "params.yaml"), official=False)
    # the demo trains on the recipe's global batch of 16 (one process instead of 8: an equivalent change, the
    # same BatchNorm groups), so only its length and crop deviate
    batch = ["iterations", "crop"]
    data_and_model = ["dataset", "config", "preset"]
    assert diffs["coco_stage"] == [*batch, "pretrained", *data_and_model]  # a random tiny trunk
    assert diffs["ade_stage"] == [*batch, "init_from", *data_and_model]  # from the (deviating) coco stage
    for mode in ("ss", "ms"):
        expected = [
            *(f"training.{key}" for key in diffs["coco_stage"]),
            "eval_scales",
            "eval_images",
            "dataset",
        ]
        assert diffs[f"coco_stage/{mode}"] == expected


def test_mlflow_tracking_uri_environment_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_params(micro_params()).tracking.uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-host:5000")
    assert parse_params(micro_params()).tracking.uri == "http://mlflow-host:5000"
