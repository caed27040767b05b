"""Run ONNX exports of a segmentor as the ``forward`` of the host-side inference loop.

An export (:mod:`pipelines.runs.onnx_export`) takes one input size. :class:`OnnxSegmentor` holds one or more
exports of the same zoo entry and is called like the segmentor's ``forward`` in
:func:`pipelines.engine.inference.slide_inference` / ``whole_inference``: (N, 3, h, w) crops in, (N, K, h, w)
scores out, each crop going to the export of its size. So sliding windows and multi-scale + flip are the
PyTorch path's own code (window placement, averaging, resizes, softmax), with the network in onnxruntime.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import SegmentorConfig

log = logging.getLogger(__name__)

# the keys of an export's metadata_props (written by pipelines.runs.onnx_export, read here)
META_ENTRY = "vitadapter.zoo_entry"
META_OVERRIDES = "vitadapter.overrides"
META_SIZE = "vitadapter.input_size"
META_DYNAMIC_BATCH = "vitadapter.dynamic_batch"
META_NUM_CLASSES = "vitadapter.num_classes"
META_OUTPUT = "vitadapter.output"
META_DEFORM_BACKEND = "vitadapter.deform_attn_backend"
META_CLASS_NAMES = "vitadapter.class_names"
META_PALETTE = "vitadapter.palette"
# the dataset record (data.catalog.DatasetInfo.to_record): a user's card is put in use from it
META_DATASET = "vitadapter.dataset"


@dataclass(frozen=True)
class _Export:
    path: Path
    session: Any  # onnxruntime.InferenceSession
    input_name: str
    dynamic_batch: bool


class OnnxSegmentor:
    """One or more ONNX exports of one zoo entry, called like the segmentor's ``forward``.

    Args:
        paths: ``.onnx`` files written by ``vitadapter export onnx`` (one per input size).
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (default: onnxruntime's choice).

    Attributes:
        entry: the zoo entry of the exports.
        overrides: its zoo overrides by full path.
        num_classes: K.
        sizes: the (H, W) sizes the exports take.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not a vitadapter export, or the files are exports of different models.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if not paths:
            raise ValueError("no ONNX file given")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._exports: dict[tuple[int, int], _Export] = {}
        identity: tuple[str, str, str] | None = None
        for raw in paths:
            path = Path(raw)
            if not path.is_file():
                raise FileNotFoundError(f"no such ONNX file: {path}")
            try:
                session = ort.InferenceSession(
                    str(path), options, providers=list(providers or ["CPUExecutionProvider"])
                )
            except Exception as err:  # onnxruntime raises its own exception types for foreign files
                raise ValueError(f"{path}: not a readable ONNX model ({err})") from err
            meta = session.get_modelmeta().custom_metadata_map
            missing = [k for k in (META_ENTRY, META_SIZE, META_NUM_CLASSES) if k not in meta]
            if missing:
                raise ValueError(
                    f"{path}: not an export of 'vitadapter export onnx' (metadata lacks {', '.join(missing)})"
                )
            this = (meta[META_ENTRY], meta.get(META_OVERRIDES, "{}"), meta[META_NUM_CLASSES])
            if identity is not None and this != identity:
                raise ValueError(
                    f"{path} is an export of {this[0]} with overrides {this[1]}, the other files of "
                    f"{identity[0]} with overrides {identity[1]}: give exports of one model"
                )
            identity = this
            if META_DATASET in meta:  # trained on a user's card: its classes before the config is built
                from pipelines.config.datasets import use_record

                use_record(json.loads(meta[META_DATASET]), source=str(path))
            height, width = (int(v) for v in meta[META_SIZE].split(","))
            self._exports[(height, width)] = _Export(
                path=path,
                session=session,
                input_name=session.get_inputs()[0].name,
                dynamic_batch=meta.get(META_DYNAMIC_BATCH) == "1",
            )
        assert identity is not None
        self.entry: str = identity[0]
        self.overrides: dict[str, Any] = json.loads(identity[1])
        self.num_classes = int(identity[2])

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return sorted(self._exports)

    def config(self, backend_overrides: dict[str, Any] | None = None) -> SegmentorConfig:
        """The zoo config the exports were made from (its test pipeline drives the host loop)."""
        import models

        return models.get_config(self.entry, {**self.overrides, **(backend_overrides or {})})

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) normalised crops -> (N, K, h, w) float32 scores (on the crops' device).

        Raises:
            ValueError: no export takes ``h x w``, naming the sizes there are.
        """
        size = (int(images.shape[2]), int(images.shape[3]))
        export = self._exports.get(size)
        if export is None:
            have = ", ".join(f"{h}x{w}" for h, w in self.sizes)
            raise ValueError(
                f"the ONNX exports take {have} inputs, this window/image is {size[0]}x{size[1]}: export that "
                f"size too (vitadapter export onnx ... --size {size[0]} {size[1]}) and pass every file with "
                "--onnx"
            )
        array = images.detach().float().cpu().numpy()
        chunks = [array] if export.dynamic_batch else [array[i : i + 1] for i in range(len(array))]
        outputs = [
            export.session.run(None, {export.input_name: np.ascontiguousarray(chunk)})[0] for chunk in chunks
        ]
        return torch.from_numpy(np.concatenate(outputs, axis=0)).to(images.device)
