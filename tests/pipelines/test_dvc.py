"""`dvc repro` on a micro setting, with the real DVC: the graph runs, reruns only what changed, and
`dvc params diff`, `dvc metrics diff` and `dvc exp run -S` work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from micro_params import micro_params, write_params
from pipelines.config.params import load_params
from pipelines.orchestration.dvcgraph import render_dvc_yaml

BIN = Path(sys.executable).parent
GIT_ID = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("dvc_repo")
    env = {
        **os.environ,
        **GIT_ID,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    _run(["git", "init", "-q"], root, env)
    _run([str(BIN / "dvc"), "init", "-q"], root, env)
    params_file = write_params(root / "params.yaml", _both_modes())
    (root / "dvc.yaml").write_text(render_dvc_yaml(load_params(params_file), raw=_both_modes()))
    (root / ".gitignore").write_text("mlflow.db\n")
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "micro pipeline"], root, env)
    return root, env


def _both_modes() -> dict:
    """The micro params evaluating single- and multi-scale: one stage runs both (the demo's graph)."""
    params = micro_params()
    params["runs"]["tiny"]["eval"]["modes"] = ["ss", "ms"]
    return params


def _second_max_iters(tree: object) -> list[int]:
    """Every ``runs.second.train.max_iters`` in the JSON ``tree`` (one per revision `dvc exp show` lists)."""
    if isinstance(tree, list):
        return [value for item in tree for value in _second_max_iters(item)]
    if not isinstance(tree, dict):
        return []
    try:
        return [tree["runs"]["second"]["train"]["max_iters"]]
    except (KeyError, TypeError):
        return [value for item in tree.values() for value in _second_max_iters(item)]


def test_repro_runs_the_graph_then_only_what_changed(repo) -> None:
    root, env = repo
    first = _run([str(BIN / "dvc"), "repro"], root, env)
    for stage in ("prepare_ade20k", "weights", "train_tiny", "evaluate_tiny", "report"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    evaluation = json.loads((root / "metrics" / "tiny" / "eval_ss.json").read_text())
    assert evaluation["published_miou"] == 42.6 and evaluation["delta_miou"] is not None
    assert all(
        isinstance(value, int | float) for value in evaluation.values()
    )  # numbers only: few DVC columns
    record = json.loads((root / "artifacts" / "reports" / "records" / "tiny" / "eval_ss.json").read_text())
    assert record["mode"] == "ss" and record["config"] == "upernet_deit_adapter_tiny_512_160k_ade20k"
    # the one evaluation stage ran both modes, each with its own records and overlays
    multi = json.loads((root / "artifacts" / "reports" / "records" / "tiny" / "eval_ms.json").read_text())
    assert multi["mode"] == "ms" and json.loads((root / "metrics" / "tiny" / "eval_ms.json").read_text())
    assert (root / "artifacts" / "reports" / "tiny" / "overlays_ms").is_dir()
    assert json.loads((root / "metrics" / "tiny" / "train.json").read_text())["iterations"] == 4
    assert len(json.loads((root / "metrics" / "tiny" / "train_curve.json").read_text())) == 2
    assert "| tiny |" in (root / "artifacts" / "reports" / "report.md").read_text()
    # no Prefect server configured: the stages ran directly (no temporary servers) and logged to MLflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("micro")
    runs = client.search_runs([experiment.experiment_id], "tags.`vitadapter.run` = 'tiny'")
    assert {r.data.tags.get("vitadapter.kind") for r in runs} >= {"train", "evaluation"}
    # the report says where the same comparison is in the UI: the runs table in the view saved on the experiment
    address = (
        f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey="
    )
    assert address in (root / "artifacts" / "reports" / "report.md").read_text()
    assert "mlflow.sharedViewState.vitadapter" in experiment.tags
    assert "Starting temporary server" not in first.stdout + first.stderr
    again = _run([str(BIN / "dvc"), "repro"], root, env)
    assert "Running stage" not in again.stdout
    # a forced rerun of the finished training (DVC deletes its metric files first) puts them back unchanged and
    # logs no second MLflow run
    before = {p.name: p.read_bytes() for p in (root / "metrics" / "tiny").glob("*.json")}
    _run([str(BIN / "dvc"), "repro", "--force", "--single-item", "train_tiny"], root, env)
    assert {p.name: p.read_bytes() for p in (root / "metrics" / "tiny").glob("*.json")} == before
    trained = client.search_runs([experiment.experiment_id], "tags.`vitadapter.kind` = 'train'")
    assert len(trained) == 1
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "results"], root, env)

    # a changed evaluation setting reruns the evaluation and the report only
    params = _both_modes()
    params["runs"]["tiny"]["eval"]["limit"] = 3
    write_params(root / "params.yaml", params)
    diff = _run([str(BIN / "dvc"), "params", "diff"], root, env)
    assert "runs.tiny.eval.limit" in diff.stdout
    rerun = _run([str(BIN / "dvc"), "repro"], root, env)
    assert (
        "Running stage 'evaluate_tiny'" in rerun.stdout and "Running stage 'train_tiny'" not in rerun.stdout
    )
    metrics = _run([str(BIN / "dvc"), "metrics", "diff", "--json"], root, env)
    assert "metrics/tiny/eval_ss.json" in metrics.stdout
    _run(["git", "checkout", "--", "params.yaml"], root, env)


# the same `dvc exp run -S` as test_an_experiment_changes_only_the_run_it_names, on the module's repository
@pytest.mark.slow
def test_exp_run_with_a_set_parameter(repo) -> None:
    root, env = repo
    _run([str(BIN / "dvc"), "repro"], root, env)  # back to the committed params
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline", "--allow-empty"], root, env)
    result = _run([str(BIN / "dvc"), "exp", "run", "-S", "runs.tiny.train.max_iters=6"], root, env)
    assert "Running stage 'train_tiny'" in result.stdout
    shown = _run([str(BIN / "dvc"), "exp", "show", "--json"], root, env)
    assert "max_iters" in shown.stdout


def test_failing_stage_stops_repro(repo, tmp_path: Path) -> None:
    root, env = repo
    broken = tmp_path / "broken"
    shutil.copytree(root, broken, ignore=shutil.ignore_patterns("artifacts", ".dvc/cache", "mlflow.db"))
    params = _both_modes()
    params["datasets"]["ade20k"] = {"source": "raw", "raw": str(tmp_path / "no_such_download")}
    write_params(broken / "params.yaml", params)
    result = subprocess.run(
        [str(BIN / "dvc"), "repro", "prepare_ade20k"],
        cwd=broken,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "ADEChallengeData2016.zip" in result.stdout + result.stderr


def test_plots_render_without_network_access(repo) -> None:
    """`vitadapter pipeline plots`: the page inlines vega and the curve data and loads nothing remote."""
    root, env = repo
    _run([str(BIN / "dvc"), "repro"], root, env)
    _run([str(BIN / "vitadapter"), "pipeline", "plots", "--out", "artifacts/plots"], root, env)
    page = (root / "artifacts" / "plots" / "index.html").read_text()
    assert "<script src" not in page and "cdn.jsdelivr" not in page
    assert page.count("<script>") >= 3 and "vegaEmbed" in page
    assert "metrics_tiny_train_curve_json" in page and '"iteration"' in page


def test_remote_push_and_pull(repo, tmp_path: Path) -> None:
    """`dvc remote add`, `dvc push`, outputs removed, `dvc pull` restores them (a folder remote here)."""
    root, env = repo
    _run([str(BIN / "dvc"), "repro"], root, env)
    remote = tmp_path / "remote"
    _run([str(BIN / "dvc"), "remote", "add", "-f", "-d", "storage", str(remote)], root, env)
    _run([str(BIN / "dvc"), "push"], root, env)
    shards = root / "artifacts" / "data" / "ade20k"
    before = sorted(p.name for p in shards.iterdir())
    shutil.rmtree(shards)
    shutil.rmtree(root / ".dvc" / "cache")
    _run([str(BIN / "dvc"), "pull"], root, env)
    assert sorted(p.name for p in shards.iterdir()) == before
    status = _run([str(BIN / "dvc"), "status"], root, env)
    assert "changed" not in status.stdout


def test_an_experiment_changes_only_the_run_it_names(tmp_path: Path) -> None:
    """`dvc exp run -S runs.<b>.train.max_iters=...` on the second run of a chain leaves the first up to date
    (params.yaml used to share one YAML anchor between the runs, so the first retrained too)."""
    root = tmp_path / "repo"
    root.mkdir()
    env = {**os.environ, **GIT_ID, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    params = micro_params()
    params["tracking"]["enabled"] = False
    first = params["runs"]["tiny"]
    params["runs"] = {
        "first": first,
        "second": {**first, "init_from": "first", "train": dict(first["train"])},
    }
    params["runs"]["first"]["eval"] = params["runs"]["second"]["eval"] = {"modes": ["ss"], "limit": 1}
    write_params(root / "params.yaml", params)
    (root / "dvc.yaml").write_text(render_dvc_yaml(load_params(root / "params.yaml"), raw=params))
    (root / ".gitignore").write_text("mlflow.db\n")
    _run(["git", "init", "-q"], root, env)
    _run([str(BIN / "dvc"), "init", "-q"], root, env)
    _run([str(BIN / "dvc"), "repro"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline"], root, env)
    result = _run([str(BIN / "dvc"), "exp", "run", "-S", "runs.second.train.max_iters=6"], root, env)
    assert "Running stage 'train_second'" in result.stdout
    assert "Running stage 'train_first'" not in result.stdout
    assert "'train_first' didn't change" in result.stdout
    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], root, env).stdout)
    # the baseline's and the experiment's params.yaml (and the workspace's), as `dvc exp show` records them
    assert set(_second_max_iters(shown)) == {first["train"]["max_iters"], 6}
