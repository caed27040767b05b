"""Start a model from a checkpoint of the same architecture trained on other classes (fine-tuning).

:func:`class_dependent_keys` finds every state-dict entry whose shape follows the number of classes (UperNet's
and the auxiliary head's ``conv_seg``, Mask2Former's ``cls_embed``, and whatever else a head sizes by it) by
building the model twice on the meta device, with K and K + 1 classes: nothing is allocated and no list of
layer names has to be kept in step with the heads. :func:`load_init_checkpoint` copies every other entry,
which must match in name and shape: a missing, unexpected or mis-shaped key outside the class-dependent layers
is an error, never a silent random initialisation. The class-dependent layers start fresh (their module's
``reset_parameters``, as the strategy-2 hand-off of docs/reference.md §R2.2 does) when the checkpoint's
classes differ from the model's, and are loaded when they are the same classes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.checkpoint import CheckpointError, LoadReport, compare_state_dict, unwrap_state_dict
from models.config import SegmentorConfig

log = logging.getLogger(__name__)


def class_dependent_keys(config: SegmentorConfig) -> list[str]:
    """The state-dict keys of ``config``'s model whose shape depends on the number of classes, in model order."""
    from models.builder import build_segmentor

    shapes = []
    for num_classes in (config.num_classes, config.num_classes + 1):
        with torch.device("meta"):
            model = build_segmentor(dataclasses.replace(config, num_classes=num_classes))
        shapes.append({key: tuple(value.shape) for key, value in model.state_dict().items()})
    return [key for key, shape in shapes[0].items() if shapes[1].get(key) != shape]


@dataclass
class InitReport:
    """What :func:`load_init_checkpoint` did.

    Attributes:
        load: the key comparison (``loaded``: the entries copied).
        reinitialised: the class-dependent entries that start fresh.
        reason: why they start fresh (or why they were loaded).
    """

    load: LoadReport
    reinitialised: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.load.to_dict(),
            "reinitialised": self.reinitialised,
            "reinitialised_reason": self.reason,
        }


def load_init_checkpoint(
    model: nn.Module,
    config: SegmentorConfig,
    state_dict: Mapping[str, Any],
    *,
    same_classes: bool | None,
    source: str | None = None,
) -> InitReport:
    """Initialise ``model`` (built from ``config``) from a checkpoint of the same architecture.

    Args:
        model: the new model.
        config: its config (the class-dependent keys follow from it).
        state_dict: the checkpoint (``state_dict``/``model`` wrappers are unwrapped).
        same_classes: whether the checkpoint was trained on the model's classes (same names, same order);
            None: unknown, decided by the shapes.
        source: the file, for messages.

    Returns:
        The report; ``reinitialised`` names the class-dependent entries that start fresh.

    Raises:
        CheckpointError: a missing or unexpected key, or a mis-shaped key outside the class-dependent layers
            (all named), or a class-dependent module without ``reset_parameters``.
    """
    tensors = unwrap_state_dict(state_dict)
    report = compare_state_dict(model.state_dict(), tensors, source=source)
    class_keys = class_dependent_keys(config)
    wrong_shape = [k for k, _, _ in report.mismatched if k not in class_keys]
    if report.missing or report.unexpected or wrong_shape:
        others = LoadReport(
            loaded=report.loaded,
            missing=report.missing,
            unexpected=report.unexpected,
            mismatched=[m for m in report.mismatched if m[0] in wrong_shape],
            source=source,
        )
        raise CheckpointError(
            "the checkpoint is not of the same architecture (only the class-dependent layers "
            f"{', '.join(class_keys)} may differ):\n" + others.summary()
        )
    mismatched = {k for k, _, _ in report.mismatched}
    if mismatched:
        counts = {k: (list(a), list(b)) for k, a, b in report.mismatched}
        first = next(iter(counts))
        reason = f"{config.num_classes} classes, the checkpoint's {first} has shape {counts[first][1]}"
        fresh = list(class_keys)
    elif same_classes is False:
        reason = "the checkpoint was trained on other classes (same count)"
        fresh = list(class_keys)
    else:
        reason = (
            "the checkpoint has the same classes" if same_classes else "same shapes, classes not recorded"
        )
        fresh = []
    owners = list(dict.fromkeys(key.rpartition(".")[0] for key in fresh))
    for owner in owners:
        reset = getattr(model.get_submodule(owner), "reset_parameters", None)
        if reset is None:
            raise CheckpointError(
                f"{owner}: a class-dependent layer without reset_parameters: cannot start it fresh"
            )
        with torch.no_grad():
            reset()
    target = model.state_dict()
    copied = [k for k in report.loaded if k not in fresh]
    with torch.no_grad():
        for key in copied:
            target[key].copy_(tensors[key].to(dtype=target[key].dtype))
    load = LoadReport(loaded=copied, mismatched=report.mismatched, source=source)
    log.debug(
        "%s: %d entries copied; fresh (%s): %s", source, len(copied), reason, ", ".join(fresh) or "none"
    )
    return InitReport(load=load, reinitialised=fresh, reason=reason)
