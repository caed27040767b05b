"""A trained segmentor as an MLflow model: a pyfunc that maps images to class-index maps.

The second module allowed to import mlflow (the model flavour needs ``mlflow.pyfunc``; every tracking call
stays in :mod:`pipelines.reporting.tracking`, which calls :func:`log_segmentation_model` when a training
run finishes).

What is logged (artifact ``model`` of the training run): the checkpoint, ``model_info.json`` (zoo entry,
overrides, class names, palette) and the pyfunc :class:`SegmentationModel`; the same facts as the MLmodel's
``metadata``; an input example (a small RGB image). It is registered in the Model Registry under the zoo
entry's name when the store has one (sqlite and the server stores do). No signature is recorded on purpose:
the input is an array of any size, a batch, or base64 strings, which one MLflow schema cannot describe.

Inputs of ``predict`` (and of the serving JSON, ``{"inputs": ...}`` or ``{"dataframe_split": ...}``):

* an (H, W, 3) RGB image array (uint8 values; JSON numbers are accepted), or an (N, H, W, 3) batch;
* base64-encoded PNG/JPEG files: one string, a list of them, or a DataFrame column of them.

Output: the (H, W) class-index map (train ids) of one image, (N, H, W) for images of one size, or a list of
maps. Each image goes through the entry's own test pipeline and sliding-window inference, exactly as
``vitadapter predict`` does (:class:`pipelines.runs.prediction.Segmenter`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import tempfile
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Schema, TensorSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from models.config import SegmentorConfig

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
INFO_FILE = "model_info.json"
# the packages the pyfunc imports; the serving environment also needs this project installed (it is the
# venv itself with --env-manager local)
_REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "scipy",
    "opencv-python-headless",
    "pyyaml",
    "mlflow",
)
EXAMPLE_SIZE = (48, 64)


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: images in, class-index maps out (see the module docstring for the accepted inputs)."""

    # MLflow would derive an input schema from predict's type hints; no one schema fits these inputs
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Build the segmentor from the logged checkpoint on CUDA when present, else the CPU."""
        import torch

        from pipelines.runs.inputs import model_from_checkpoint
        from pipelines.runs.prediction import Segmenter

        info = json.loads(Path(context.artifacts["model_info"]).read_text())
        if isinstance(info.get("dataset_record"), dict):  # a user's card: its classes known before the build
            from pipelines.config.datasets import use_record

            use_record(info["dataset_record"], source=context.artifacts["model_info"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, config, _ = model_from_checkpoint(
            info["zoo_entry"], context.artifacts["checkpoint"], info["overrides"], device=device
        )
        self._segment = Segmenter(model, config, device=device)

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:
        """Class-index maps of ``model_input`` (one image, a batch, or base64 PNG/JPEG strings; no annotation:
        MLflow would try to derive a schema from it when saving)."""
        images, single = decode_images(model_input)
        maps = [self._segment(image).astype(np.int64) for image in images]
        if single:
            return maps[0]
        if len({m.shape for m in maps}) == 1:
            return np.stack(maps)
        return [m.tolist() for m in maps]


def decode_images(model_input: Any) -> tuple[list[np.ndarray], bool]:
    """The (H, W, 3) uint8 BGR images of a pyfunc input, and whether it was a single image.

    Raises:
        ValueError: an input that is neither an image array nor base64 PNG/JPEG, naming what it got.
    """
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return [_one_image(value) for value in model_input[column].tolist()], False
    if isinstance(model_input, dict) and "image" in model_input:
        return decode_images(model_input["image"])
    if isinstance(model_input, str | bytes):
        return [_decode_file(model_input)], True
    array = np.asarray(model_input) if isinstance(model_input, list) else model_input
    if isinstance(array, np.ndarray):
        if array.dtype.kind in "USO":  # strings: base64 files
            return [_one_image(value) for value in array.reshape(-1).tolist()], array.ndim == 0
        if array.ndim == 3:
            return [_rgb_to_bgr(array)], True
        if array.ndim == 4:
            return [_rgb_to_bgr(image) for image in array], False
    shape = getattr(array, "shape", None)
    raise ValueError(
        f"model input of type {type(model_input).__name__}{f' and shape {shape}' if shape else ''}: expected an "
        "(H, W, 3) RGB image, an (N, H, W, 3) batch, or base64 PNG/JPEG strings"
    )


def _one_image(value: Any) -> np.ndarray:
    if isinstance(value, str | bytes):
        return _decode_file(value)
    return _rgb_to_bgr(np.asarray(value))


def _rgb_to_bgr(array: np.ndarray) -> np.ndarray:
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image array must be (H, W, 3) RGB, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"image values must lie in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array[:, :, ::-1])


def _decode_file(value: str | bytes) -> np.ndarray:
    import cv2

    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"an image string must be a base64-encoded PNG or JPEG file ({err})") from err
    image = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("an image string decodes to no readable PNG/JPEG image")
    return image


def encode_image(path_or_bgr: Path | np.ndarray) -> str:
    """A file's bytes (or a BGR array as PNG) in base64: what the serving JSON carries."""
    if isinstance(path_or_bgr, np.ndarray):
        import cv2

        ok, buffer = cv2.imencode(".png", path_or_bgr)
        if not ok:
            raise ValueError("could not encode the image as PNG")
        return base64.b64encode(buffer.tobytes()).decode("ascii")
    return base64.b64encode(Path(path_or_bgr).read_bytes()).decode("ascii")


def model_info(config: SegmentorConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """What the pyfunc rebuilds the model from, and what a reader of the MLmodel wants to know."""
    from data.catalog import get_dataset
    from pipelines.runs.inputs import class_names, palette

    return {
        "zoo_entry": config.name,
        "overrides": dict(overrides),
        "dataset": config.data.dataset,
        "num_classes": config.num_classes,
        "class_names": list(class_names(config)),
        "palette": palette(config).tolist(),
        # the whole dataset record (a user's card: its classes and palette) the model is rebuilt with
        "dataset_record": get_dataset(config.data.dataset).to_record(),
        "input": "RGB uint8 (H, W, 3) array, (N, H, W, 3) batch, or base64 PNG/JPEG strings",
        "output": "class-index map (H, W) per image (train ids)",
    }


def example_image() -> np.ndarray:
    """A small RGB gradient: the input example (any size works; the test pipeline resizes it)."""
    height, width = EXAMPLE_SIZE
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], axis=-1).astype(np.uint8)


def _requirements() -> list[str]:
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={package_metadata.version(name)}")
        except package_metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def save_segmentation_model(
    path: Path, *, checkpoint: Path, config: SegmentorConfig, overrides: dict[str, Any]
) -> Path:
    """Write the MLflow model folder ``path`` (pyfunc, checkpoint, info, input example); returns it."""
    info = model_info(config, overrides)
    with tempfile.TemporaryDirectory() as scratch:
        info_file = Path(scratch) / INFO_FILE
        info_file.write_text(json.dumps(info, indent=1))
        # a signature only to check the example when saving; removed below (see the module docstring)
        check = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]))
        mlflow.pyfunc.save_model(
            str(path),
            python_model=SegmentationModel(),
            artifacts={"checkpoint": str(checkpoint), "model_info": str(info_file)},
            input_example=example_image(),
            signature=check,
            pip_requirements=_requirements(),
            metadata={k: v for k, v in info.items() if k not in ("input", "output")},
        )
    model = Model.load(str(path))
    model.signature = None
    model.save(str(Path(path) / "MLmodel"))
    return Path(path)


def log_segmentation_model(
    client: MlflowClient,
    run_id: str,
    *,
    checkpoint: Path,
    config: SegmentorConfig,
    overrides: dict[str, Any],
    register: bool = True,
) -> dict[str, Any]:
    """Log the pyfunc of ``checkpoint`` as artifact ``model`` of run ``run_id`` and register it under
    :func:`registered_name` (the zoo entry's name; ``<entry>-<card>`` on a user's card) when the store has a
    Model Registry.

    Returns:
        ``model_uri`` (``runs:/<run>/model``), ``registered`` (name) and ``version`` (None when not registered).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint to log as an MLflow model: {checkpoint}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = save_segmentation_model(
            Path(scratch) / MODEL_ARTIFACT, checkpoint=checkpoint, config=config, overrides=overrides
        )
        client.log_artifacts(run_id, str(folder), MODEL_ARTIFACT)
    result: dict[str, Any] = {
        "model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT}",
        "registered": None,
        "version": None,
    }
    if not register:
        return result
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    name = registered_name(config)
    try:
        try:
            client.create_registered_model(
                name, description=f"ViT-Adapter zoo entry {config.name} on {config.data.dataset}"
            )
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            source,
            run_id=run_id,
            tags={"zoo_entry": config.name, "dataset": config.data.dataset, "checkpoint": checkpoint.name},
        )
    except MlflowException as err:  # a store without a Model Registry: the logged model stays usable
        log.warning("MLflow: model of run %s logged but not registered as %s: %s", run_id, name, err)
        return result
    log.info("MLflow: registered models:/%s/%s (run %s)", name, version.version, run_id)
    return {**result, "registered": name, "version": int(version.version)}


def registered_name(config: SegmentorConfig) -> str:
    """The Model Registry name of a model of ``config``: the zoo entry's name, and on a user's dataset card
    ``<entry>-<card>`` (a model of other classes is never a version of the entry's own model)."""
    from pipelines.config.datasets import has_published_row

    return config.name if has_published_row(config) else f"{config.name}-{config.data.dataset}"
