"""One evaluation entry point (`evaluate_model`) behind the evaluate command, the evaluate stage and the
evaluations of training; every MLflow run records the deformable-attention backend that ran."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from micro_params import cli_model_args, micro_params, write_params
from pipelines.cli import main
from pipelines.config.params import load_params
from pipelines.orchestration import stages
from pipelines.runs import evaluation


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of evaluate_model (still evaluating), recorded by the data it was given."""
    seen: list[str] = []
    real = evaluation.evaluate_model

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(kwargs.get("mode", "ss"))
        return result

    monkeypatch.setattr(evaluation, "evaluate_model", spy)
    return seen


def test_command_stage_and_training_all_evaluate_through_evaluate_model(
    tmp_path: Path, calls: list[str]
) -> None:
    params = micro_params()
    params["paths"] = {key: str(tmp_path / value) for key, value in params["paths"].items()}
    params["tracking"] = {**params["tracking"], "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    params["runs"]["tiny"]["train"].update(max_iters=2, eval_interval=2, checkpoint_interval=2)
    params["runs"]["tiny"]["overrides"] = {
        **params["runs"]["tiny"]["overrides"],
        "deform_attn_backend": "pytorch",
    }
    path = write_params(tmp_path / "params.yaml", params)
    loaded = load_params(path)
    stages.prepare_stage(loaded, "ade20k")
    stages.train_stage(loaded, "tiny", params_file=path)
    assert calls == ["ss"]  # the evaluation at the end of training
    result = stages.evaluate_stage(loaded, "tiny", "ss")
    assert calls == ["ss", "ss"] and result["deform_attn_backend"] == "pytorch"
    checkpoint = Path(loaded.paths.runs) / "tiny" / "iter_0000002.pth"
    args = [
        "evaluate",
        "--no-tracking",
        loaded.runs["tiny"].config,
        "--checkpoint",
        str(checkpoint),
        "--no-progress",
    ]
    assert main([*args, "--data", str(loaded.data_dir("ade20k")), "--mode", "ms", "--limit", "1"]) == 0
    assert calls == ["ss", "ss", "ms"]

    client = MlflowClient(loaded.tracking.uri)
    experiment = client.get_experiment_by_name(loaded.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    kinds = {run.data.tags.get("vitadapter.kind"): run for run in runs}
    assert kinds["train"].data.params["deform_attn_backend"] == "pytorch"
    assert kinds["evaluation"].data.params["deform_attn_backend"] == "pytorch"


def test_the_backend_knob_reaches_the_model_and_the_environment_decides_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import cuda_ops
    import models
    from models.adapter.ms_deform_attn import MSDeformAttn

    model = models.create_segmentor(
        "upernet_deit_adapter_tiny_512_160k_ade20k", {"deform_attn_backend": "pytorch"}, preset="tiny"
    )
    assert {m.backend for m in model.modules() if isinstance(m, MSDeformAttn)} == {"pytorch"}
    monkeypatch.setenv(cuda_ops.BACKEND_ENV, "pytorch")
    assert (
        cuda_ops.requested_backend("auto") == "pytorch" and cuda_ops.requested_backend("triton") == "triton"
    )
    monkeypatch.setenv(cuda_ops.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="VITADAPTER_DEFORM_ATTN_BACKEND='cuda' is not one of"):
        cuda_ops.requested_backend("auto")
    # the command line flag is the config field
    assert (
        main(
            [
                "configs",
                "show",
                "upernet_deit_adapter_tiny_512_160k_ade20k",
                "--deform-attn-backend",
                "triton",
                *cli_model_args(),
            ]
        )
        == 0
    )


def test_overlays_are_drawn_from_the_evaluation_pass_itself(tmp_path: Path) -> None:
    """Writing overlays adds no pass over the images: the model runs exactly as often, and the overlays of the
    first images show the predictions the metrics were computed from."""
    import cv2
    import torch

    from micro_params import ade_twin_shards, tiny_config, tiny_model
    from pipelines.reporting.visualize import overlay_with_legend
    from pipelines.runs.inputs import class_names, eval_items, palette

    name = "upernet_deit_adapter_tiny_512_160k_ade20k"
    data = ade_twin_shards(
        tmp_path, num_train=2, num_val=3, seed=3, min_size=64, max_size=80, num_classes_used=4
    )
    torch.manual_seed(0)
    model, config = tiny_model(name), tiny_config(name)
    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    predictions: dict[str, object] = {}

    def keep(item: dict, pred: object) -> None:
        predictions[str(item["key"])] = pred

    plain = evaluation.evaluate_model(model, config, data, mode="ss")
    alone = len(forwards)
    forwards.clear()
    drawn = evaluation.evaluate_model(
        model, config, data, mode="ss", overlays_dir=tmp_path / "overlays", on_prediction=keep
    )
    assert len(forwards) == alone > 0 and drawn.metrics == plain.metrics
    assert [p.name for p in drawn.artifacts] == [f"{key}.png" for key in list(predictions)[:2]]
    images = {str(item["key"]): item["image"] for item in eval_items(config, data).items}
    for path in drawn.artifacts:
        expected = overlay_with_legend(
            images[path.stem], predictions[path.stem], palette(config), class_names(config)
        )
        assert (
            cv2.imread(str(path)) == expected
        ).all()  # a PNG is lossless: the overlay of that very prediction
