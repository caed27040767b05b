"""The class confusion matrix of an evaluation as files: the counts (CSV) and a normalised heat map (PNG).

The heat map shows each label row normalised to 1 (the share of the label's pixels predicted as each class).
At 150 or 171 classes no per-class tick labels would be readable, so the classes are named only in a list of
the most confused pairs beside the map (by pixels); up to :data:`NAMED_TICKS_MAX` classes the axes carry the
names too. Drawn with matplotlib's Figure API (no pyplot, no global state, any thread).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.atomic import atomic_write, write_text_atomic

NAMED_TICKS_MAX = 30
TOP_PAIRS = 25


def normalise_rows(confusion: np.ndarray) -> np.ndarray:
    """(K, K) counts -> each row divided by its sum (rows without pixels stay 0)."""
    counts = confusion.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def top_confused_pairs(
    confusion: np.ndarray, class_names: Sequence[str], *, count: int = TOP_PAIRS
) -> list[dict[str, object]]:
    """The off-diagonal cells with the most pixels, most first.

    Returns:
        ``{"label", "predicted", "label_id", "predicted_id", "pixels", "share"}`` per pair; ``share`` is the
        fraction of the label's pixels predicted as that class.
    """
    shares = normalise_rows(confusion)
    off = confusion.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:count]
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), confusion.shape[1])
        if off[i, j] == 0:
            break
        pairs.append(
            {
                "label": str(class_names[i]).strip(),
                "predicted": str(class_names[j]).strip(),
                "label_id": i,
                "predicted_id": j,
                "pixels": int(off[i, j]),
                "share": float(shares[i, j]),
            }
        )
    return pairs


def confusion_csv(confusion: np.ndarray, class_names: Sequence[str]) -> str:
    """The counts as CSV: a header of the predicted classes, one row per label class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [str(name).strip() for name in class_names]
    writer.writerow(["label \\ predicted", *names])
    for name, row in zip(names, confusion.astype(np.int64).tolist(), strict=True):
        writer.writerow([name, *row])
    return buffer.getvalue()


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], *, title: str = "") -> bytes:
    """The row-normalised heat map with the list of the most confused pairs, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_classes = confusion.shape[0]
    names = [str(name).strip() for name in class_names]
    figure = Figure(figsize=(15, 8.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, 2, width_ratios=(1.35, 1))
    heat = figure.add_subplot(grid[0, 0])
    image = heat.imshow(
        normalise_rows(confusion), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    figure.colorbar(image, ax=heat, fraction=0.046, pad=0.02, label="share of the label's pixels")
    if num_classes <= NAMED_TICKS_MAX:
        heat.set_xticks(range(num_classes), names, rotation=90, fontsize=7)
        heat.set_yticks(range(num_classes), names, fontsize=7)
    heat.set_xlabel("predicted class (train id)")
    heat.set_ylabel("label class (train id)")
    heat.set_title(f"confusion, rows normalised{f': {title}' if title else ''} ({num_classes} classes)")
    listing = figure.add_subplot(grid[0, 1])
    listing.axis("off")
    pairs = top_confused_pairs(confusion, names)
    lines = [f"most confused pairs, by pixels (of {int(confusion.sum()):,} labelled pixels)", ""]
    lines.append("     label -> predicted: share of the label's pixels")
    lines += [
        f"{k:2d}. {p['label_id']:>3} {p['label'][:20]} -> {p['predicted_id']:>3} {p['predicted'][:20]}: "
        f"{100 * p['share']:.1f}% ({p['pixels']:,} px)"
        for k, p in enumerate(pairs, start=1)
    ]
    if not pairs:
        lines.append("(none: every labelled pixel is predicted as its label)")
    listing.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_confusion(
    confusion: np.ndarray | None, class_names: Sequence[str], base: Path, *, title: str = ""
) -> list[Path]:
    """Write ``<base>.csv`` (counts) and ``<base>.png`` (heat map); returns them (none without a matrix).

    Raises:
        ValueError: ``class_names`` does not name every class of the matrix.
    """
    if confusion is None:
        return []
    if len(class_names) != confusion.shape[0] or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(
            f"confusion matrix {confusion.shape} and {len(class_names)} class names do not match ({base})"
        )
    base = Path(base)
    csv_path = write_text_atomic(base.with_name(f"{base.name}.csv"), confusion_csv(confusion, class_names))
    png = confusion_figure(confusion, class_names, title=title)
    png_path = atomic_write(base.with_name(f"{base.name}.png"), lambda handle: handle.write(png))
    return [csv_path, png_path]
