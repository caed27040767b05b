"""Webdataset shards of a prepared dataset: writing, indexed reading, validation.

Layout of a prepared dataset folder::

    index.json              counts, per-class pixel histograms, shard checksums, label convention
    train-000000.tar ...    webdataset shards of the train split
    val-000000.tar ...

Each sample of a shard has three members sharing its key: ``<key>.<ext>`` the original image bytes (never
re-encoded), ``<key>.label.png`` the train-id label map as a lossless single-channel 8-bit PNG, and
``<key>.json`` its metadata (key, split, original size, source file names, raw label encoding).

``index.json`` is written last: a folder without it (or whose shards disagree with it) is half-written and is
never read. Label PNGs are decoded here with ``cv2.IMREAD_UNCHANGED``; webdataset's image decoders would turn
them into RGB or luminance and destroy the class indices (``docs/reference.md`` §E3).

This is the only module of ``data`` that imports webdataset (used to write the shards, imported on first use
because it imports torch; reading uses ``tarfile`` offsets for random access).

Damage found while reading (a shard truncated or rewritten after preparation, a member cut short, an image
that no longer decodes) is a :class:`CorruptSampleError` naming the shard file and the sample key; a shard
that no longer matches ``index.json`` when it is first opened is one too, naming the first sample cut off.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

from data.atomic import file_sha256
from data.catalog import IGNORE_INDEX, LabelError, check_train_ids, get_dataset
from data.readers import CorruptFileError, decode_image

if TYPE_CHECKING:
    import webdataset

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LABEL_SUFFIX = "label.png"
META_SUFFIX = "json"
SHARD_PATTERN = "{split}-{number:06d}.tar"
DEFAULT_SAMPLES_PER_SHARD = 1000
PNG_COMPRESSION = 3
# Fixed member time stamps make shards byte-identical across runs.
MEMBER_MTIME = 0.0

VerifyLevel = Literal["none", "size", "sha256"]


class IncompleteDatasetError(RuntimeError):
    """A prepared-dataset folder is half-written or altered; it must be prepared again."""


class CorruptSampleError(IncompleteDatasetError):
    """A sample of a prepared shard cannot be read or decoded (the shard was damaged after preparation).

    Attributes:
        shard: the shard file.
        key: the sample's key (None when the damage hides it: the shard's listing is cut short before it).
        reason: what is wrong.
    """

    def __init__(self, shard: str | Path, key: str | None, reason: str) -> None:
        self.shard = str(shard)
        self.key = key
        self.reason = reason
        named = f"sample {key!r}" if key is not None else "a sample"
        super().__init__(f"{shard}: {named} cannot be read: {reason}")

    def to_record(self) -> dict[str, Any]:
        """A plain, picklable record (what a loader worker hands to the main process)."""
        return {"shard": self.shard, "key": self.key, "reason": self.reason, "message": str(self)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CorruptSampleError:
        return cls(record["shard"], record.get("key"), record["reason"])

    def __reduce__(self) -> tuple[Any, ...]:
        return (CorruptSampleError, (self.shard, self.key, self.reason))


def encode_label_png(label: np.ndarray) -> bytes:
    """Encode a ``(H, W)`` uint8 train-id map as a lossless single-channel 8-bit PNG."""
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 label map, got shape {label.shape} {label.dtype}")
    ok, encoded = cv2.imencode(".png", label, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError("PNG encoding of a label map failed")
    return encoded.tobytes()


def decode_label_png(data: bytes, *, source: str) -> np.ndarray:
    """Decode a label PNG unchanged (never through an RGB conversion): ``(H, W)`` uint8.

    Raises:
        LabelError: naming ``source`` when the PNG does not decode to a single-channel 8-bit map.
    """
    label = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
        raise LabelError(f"{source}: not a single-channel 8-bit label PNG")
    return label


def dumps_json(value: Any) -> str:
    """Deterministic JSON (sorted keys) so re-running gives the same bytes."""
    return json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: name in the folder, number of samples, size in bytes and sha256."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass
class SplitIndex:
    """What a split of a prepared dataset holds.

    Attributes:
        num_samples: samples written.
        shards: the shard files, in order.
        class_pixels: pixel count per train id (length ``num_classes``).
        ignore_pixels: pixels labelled 255.
        skipped: samples skipped as corrupt (``key``, ``reason``), with ``--skip-corrupt``.
        encodings: raw label encodings met, with their sample counts.
    """

    num_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    class_pixels: list[int] = field(default_factory=list)
    ignore_pixels: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    encodings: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> SplitIndex:
        """Inverse of ``dataclasses.asdict``."""
        return cls(**{**value, "shards": [ShardInfo(**s) for s in value["shards"]]})


@dataclass
class DatasetIndex:
    """Contents of ``index.json``."""

    dataset: str
    num_classes: int
    class_names: list[str]
    ignore_index: int
    label_convention: str
    splits: dict[str, SplitIndex]
    inputs_fingerprint: str
    format_version: int = FORMAT_VERSION
    complete: bool = True
    # where the samples came from (data.provenance.describe_raw); None in indexes written before it existed
    source: dict[str, Any] | None = None
    # the dataset card a user's data was prepared from (file, sha256, content); None for the built-in datasets
    card: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Serialise deterministically (without ``card`` for the built-in datasets: their indexes stay as they were)."""
        value = asdict(self)
        if value["card"] is None:
            del value["card"]
        return dumps_json(value)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> DatasetIndex:
        """Parse ``index.json``; ``IncompleteDatasetError`` naming ``source`` when it is not one."""
        try:
            value = json.loads(text)
            value["splits"] = {k: SplitIndex.from_dict(v) for k, v in value["splits"].items()}
            return cls(**value)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise IncompleteDatasetError(f"{source}: not a valid prepared-dataset index ({err})") from err


class SplitWriter:
    """Write one split's samples into numbered webdataset shards of ``samples_per_shard`` samples each."""

    def __init__(self, directory: Path, split: str, *, num_classes: int, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.directory = directory
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.index = SplitIndex(class_pixels=[0] * num_classes)
        self._num_classes = num_classes
        self._writer: webdataset.TarWriter | None = None
        self._path: Path | None = None
        self._in_shard = 0

    def _open_next(self) -> None:
        import webdataset  # imported here: it imports torch, which reading and validating shards do not need

        self._path = self.directory / SHARD_PATTERN.format(split=self.split, number=len(self.index.shards))
        self._writer = webdataset.TarWriter(str(self._path), encoder=False, mtime=MEMBER_MTIME)
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._writer is None or self._path is None:
            return
        self._writer.close()
        shard = ShardInfo(self._path.name, self._in_shard, self._path.stat().st_size, file_sha256(self._path))
        self.index.shards.append(shard)
        self._writer, self._path = None, None

    def write(
        self, *, key: str, image_bytes: bytes, image_ext: str, label: np.ndarray, meta: dict[str, Any]
    ) -> None:
        """Add one sample.

        Args:
            key: sample key (no dots).
            image_bytes: the original image file's bytes.
            image_ext: the image file's extension without the dot (``jpg``).
            label: ``(H, W)`` uint8 train ids.
            meta: JSON-serialisable metadata.
        """
        check_key(key, source=f"{self.split} split")
        check_train_ids(label, self._num_classes, source=f"{self.split}/{key}")
        sample = {
            "__key__": key,
            image_ext.lower(): image_bytes,
            LABEL_SUFFIX: encode_label_png(label),
            META_SUFFIX: dumps_json(meta).encode(),
        }
        with self._naming_the_shard():
            if self._writer is None:
                self._open_next()
            assert self._writer is not None  # opened just above
            self._writer.write(sample)
        counts = np.bincount(label.ravel(), minlength=256)
        for class_id in np.flatnonzero(counts[: self._num_classes]).tolist():
            self.index.class_pixels[class_id] += int(counts[class_id])
        self.index.ignore_pixels += int(counts[IGNORE_INDEX])
        self.index.num_samples += 1
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            with self._naming_the_shard():
                self._close_current()

    def close(self) -> SplitIndex:
        """Finish the last shard and return the split's index."""
        with self._naming_the_shard():
            self._close_current()
        return self.index

    @contextlib.contextmanager
    def _naming_the_shard(self) -> Iterator[None]:
        """An ``OSError`` of the tar writer (a full disk) names the shard being written."""
        try:
            yield
        except OSError as err:
            if err.filename is not None or self._path is None:
                raise
            raise OSError(err.errno, err.strerror, str(self._path)) from err


@dataclass(frozen=True)
class ShardRecord:
    """One sample as stored: raw member bytes plus metadata."""

    key: str
    image_bytes: bytes
    label_bytes: bytes
    meta: dict[str, Any]
    source: str

    def decode(self) -> tuple[np.ndarray, np.ndarray]:
        """Decode to ``(image (H, W, 3) uint8 BGR, label (H, W) uint8 train ids)``.

        Raises:
            CorruptSampleError: the image or the label map does not decode, naming the shard and the key.
        """
        try:
            image = decode_image(self.image_bytes, source=f"{self.source}:{self.key}")
            label = decode_label_png(self.label_bytes, source=f"{self.source}:{self.key}.{LABEL_SUFFIX}")
        except (CorruptFileError, LabelError) as err:
            reason = str(err)
            for prefix in (f"{self.source}:{self.key}.{LABEL_SUFFIX}: ", f"{self.source}:{self.key}: "):
                if reason.startswith(prefix):  # the shard and the key are named once, by the new error
                    reason = ("label map: " if LABEL_SUFFIX in prefix else "image: ") + reason[len(prefix) :]
                    break
            raise CorruptSampleError(self.source, self.key, reason) from err
        return image, label


# a sample key is one plain name: it becomes part of output file names (overlays, predictions)
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")


class UnsafeKeyError(ValueError):
    """A sample key is not one plain name (it could name a path); the message names the shard and the key."""


def check_key(key: str, *, source: str) -> None:
    """Refuse a sample key that is not one path component of letters, digits, ``_`` and ``-``.

    Dots are refused too: webdataset splits a member name at its first dot into key and extension.

    Raises:
        UnsafeKeyError: naming ``source`` and the key.
    """
    if not _SAFE_KEY.fullmatch(key):
        raise UnsafeKeyError(
            f"{source}: sample key {key!r} is not a plain name (1-200 letters, digits, '_' or '-'); "
            "refusing it: keys become output file names"
        )


class ShardFile:
    """Random access to the samples of one shard through the member offsets of the tar file.

    A listing cut short (a truncated file) keeps the samples before the cut; ``listing_error`` says why it
    stopped (None: the whole file was listed).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._members: dict[str, dict[str, tuple[int, int]]] = {}
        self._keys: list[str] = []
        self._handle = None
        self.listing_error: str | None = None
        try:
            with tarfile.open(path, mode="r:") as tar:
                self._list(tar)
        except (tarfile.TarError, OSError) as err:
            raise CorruptSampleError(path, None, f"not a readable tar file ({err})") from err
        self.size = path.stat().st_size
        # the members whose bytes lie past the end of the file: cut off by a truncation
        self.cut_off = [
            key
            for key in self._keys
            if any(offset + size > self.size for offset, size in self._members[key].values())
        ]

    def _list(self, tar: tarfile.TarFile) -> None:
        """Index the members, stopping where the listing breaks off (``listing_error``)."""
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                self.listing_error = str(err) or type(err).__name__
                return
            if member is None:
                return
            key, _, suffix = member.name.partition(".")
            check_key(key, source=str(self.path))
            if key not in self._members:
                self._members[key] = {}
                self._keys.append(key)
            self._members[key][suffix] = (member.offset_data, member.size)

    @property
    def keys(self) -> list[str]:
        """Sample keys in shard order."""
        return self._keys

    def read(self, key: str) -> ShardRecord:
        """Read one sample.

        Raises:
            CorruptSampleError: a member is missing, cut short (the file was truncated after it was listed)
                or its metadata is not JSON; naming the shard and ``key``.
        """
        try:
            if self._handle is None:
                self._handle = self.path.open("rb")
            members = self._members[key]
            contents: dict[str, bytes] = {}
            for suffix, (offset, size) in members.items():
                self._handle.seek(offset)
                contents[suffix] = self._handle.read(size)
                if len(contents[suffix]) != size:
                    raise CorruptSampleError(
                        self.path,
                        key,
                        f"member {key}.{suffix} is cut short ({len(contents[suffix])} of {size} bytes: the "
                        "shard was truncated after preparation)",
                    )
        except OSError as err:  # the file went away or the disk failed under the run
            raise CorruptSampleError(self.path, key, f"the shard cannot be read ({err})") from err
        image_suffixes = [s for s in contents if s not in (LABEL_SUFFIX, META_SUFFIX)]
        if len(image_suffixes) != 1 or LABEL_SUFFIX not in contents or META_SUFFIX not in contents:
            raise CorruptSampleError(self.path, key, f"it lacks members (has {sorted(contents)})")
        try:
            meta = json.loads(contents[META_SUFFIX])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptSampleError(self.path, key, f"its {META_SUFFIX} member is not JSON ({err})") from err
        return ShardRecord(
            key=key,
            image_bytes=contents[image_suffixes[0]],
            label_bytes=contents[LABEL_SUFFIX],
            meta=meta,
            source=str(self.path),
        )

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles do not travel to worker processes; each re-opens lazily.
        return {**self.__dict__, "_handle": None}


class PreparedSplit:
    """The samples of one split, addressable by index ``0 .. len - 1`` (shard order).

    Shards are indexed lazily, one at a time, when a sample of theirs is first read.
    """

    def __init__(self, root: Path, split: str, index: SplitIndex) -> None:
        self.root = root
        self.split = split
        self.index = index
        self._starts = list(itertools.accumulate((s.num_samples for s in index.shards), initial=0))
        self._files: list[ShardFile | None] = [None] * len(index.shards)
        self._broken: dict[int, CorruptSampleError] = {}

    def __len__(self) -> int:
        return self.index.num_samples

    def _file(self, number: int) -> ShardFile:
        shard = self._files[number]
        if shard is None:
            if number in self._broken:  # a shard that cannot be listed fails at once for every sample
                raise self._broken[number]
            info = self.index.shards[number]
            try:
                shard = ShardFile(self.root / info.name)
            except CorruptSampleError as err:
                self._broken[number] = err
                raise
            # fewer samples: a truncated file, whose missing samples fail when read (record); more: another file
            if len(shard.keys) > info.num_samples or (
                len(shard.keys) < info.num_samples
                and shard.listing_error is None
                and shard.size == info.num_bytes
            ):
                raise IncompleteDatasetError(
                    f"{shard.path}: {len(shard.keys)} samples, {INDEX_FILE} says {info.num_samples}; prepare again"
                )
            self._files[number] = shard
        return shard

    def keys(self) -> list[str]:
        """Sample keys in index order."""
        return [key for number in range(len(self._files)) for key in self._file(number).keys]

    def record(self, position: int) -> ShardRecord:
        """The sample at ``position``.

        Raises:
            CorruptSampleError: the sample cannot be read, naming its shard and key (or, when a truncation
                cut the shard's listing before it, its number in the shard and the last key before the cut).
        """
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} outside split {self.split} of {len(self)} samples")
        number = bisect.bisect_right(self._starts, position) - 1
        shard = self._file(number)
        offset = position - self._starts[number]
        if offset >= len(shard.keys):
            info = self.index.shards[number]
            after = f" (the last readable one is {shard.keys[-1]!r})" if shard.keys else ""
            raise CorruptSampleError(
                shard.path,
                None,
                f"sample {offset + 1} of {info.num_samples} is missing from the shard{after}: it was truncated "
                f"after preparation ({shard.size} of {info.num_bytes} bytes)",
            )
        return shard.read(shard.keys[offset])


class PreparedDataset:
    """A prepared dataset folder, checked against its ``index.json``."""

    def __init__(self, root: Path, index: DatasetIndex) -> None:
        self.root = root
        self.index = index

    @classmethod
    def open(cls, root: str | Path, *, verify: VerifyLevel = "size") -> PreparedDataset:
        """Open ``root``; refuse a half-written or altered folder.

        Args:
            root: the folder ``vitadapter data prepare`` wrote.
            verify: ``size`` checks every shard exists with its recorded size (cheap), ``sha256`` also
                checks the checksums, ``none`` only reads the index.

        Raises:
            IncompleteDatasetError: naming the folder and what is wrong.
        """
        root = Path(root)
        index_path = root / INDEX_FILE
        if not index_path.is_file():
            raise IncompleteDatasetError(
                f"{root} is not a complete prepared dataset (no {INDEX_FILE}; an interrupted run?): "
                "run `vitadapter data prepare` again"
            )
        index = DatasetIndex.from_json(index_path.read_text(), source=str(index_path))
        if not index.complete or index.format_version != FORMAT_VERSION:
            raise IncompleteDatasetError(
                f"{index_path}: incomplete or format version {index.format_version} (expected "
                f"{FORMAT_VERSION}); prepare the dataset again"
            )
        if verify != "none":
            for split in index.splits.values():
                for shard in split.shards:
                    _verify_shard(root / shard.name, shard, checksum=verify == "sha256")
        return cls(root, index)

    def split(self, name: str) -> PreparedSplit:
        """The split ``name`` (``train`` or ``val``)."""
        if name not in self.index.splits:
            raise ValueError(f"{self.root} has no split {name!r}; it has {sorted(self.index.splits)}")
        return PreparedSplit(self.root, name, self.index.splits[name])


def _verify_shard(path: Path, shard: ShardInfo, *, checksum: bool) -> None:
    if not path.is_file():
        raise IncompleteDatasetError(f"{path}: shard listed in {INDEX_FILE} is missing; prepare again")
    size = path.stat().st_size
    if size < shard.num_bytes:
        raise CorruptSampleError(
            path,
            _first_cut_off(path),
            f"the shard is truncated ({size} of {shard.num_bytes} bytes, as {INDEX_FILE} records); prepare again",
        )
    if size != shard.num_bytes:
        raise IncompleteDatasetError(
            f"{path}: {size} bytes, {INDEX_FILE} says {shard.num_bytes}; prepare again"
        )
    if checksum and file_sha256(path) != shard.sha256:
        raise IncompleteDatasetError(f"{path}: sha256 differs from {INDEX_FILE}; prepare again")


def _first_cut_off(path: Path) -> str | None:
    """The key of the first sample a truncation cut off (None: the cut is in the listing before any key)."""
    try:
        shard = ShardFile(path)
    except CorruptSampleError:
        return None
    return shard.cut_off[0] if shard.cut_off else None


def validate_prepared(root: str | Path, *, decode_images: bool = False) -> DatasetIndex:
    """Check a prepared dataset completely.

    Verifies the shard checksums, that every label map is a single-channel 8-bit PNG with values in
    ``[0, num_classes)`` or 255 and of the recorded size, and that counts and per-class histograms agree
    with ``index.json``. With ``decode_images`` every image is decoded too.

    Returns:
        The dataset's index.

    Raises:
        IncompleteDatasetError: missing, altered or inconsistent files.
        LabelError: a label outside the classes and 255, naming the shard member.
    """
    dataset = PreparedDataset.open(root, verify="sha256")
    # a user's card is described by the index itself; a built-in dataset's class count comes from the catalog
    num_classes = (
        dataset.index.num_classes
        if dataset.index.card is not None
        else get_dataset(dataset.index.dataset).num_classes
    )
    for name, split_index in dataset.index.splits.items():
        split = dataset.split(name)
        class_pixels = np.zeros(num_classes, dtype=np.int64)
        ignore_pixels = 0
        for position in range(len(split)):
            record = split.record(position)
            source = f"{record.source}:{record.key}.{LABEL_SUFFIX}"
            label = decode_label_png(record.label_bytes, source=source)
            check_train_ids(label, num_classes, source=source)
            if [label.shape[0], label.shape[1]] != [record.meta["height"], record.meta["width"]]:
                raise IncompleteDatasetError(f"{source}: label size {label.shape} differs from its metadata")
            if decode_images:
                image = decode_image(record.image_bytes, source=f"{record.source}:{record.key}")
                if image.shape[:2] != label.shape:
                    raise IncompleteDatasetError(f"{source}: image size {image.shape[:2]} differs from label")
            counts = np.bincount(label.ravel(), minlength=256)
            class_pixels += counts[:num_classes]
            ignore_pixels += int(counts[IGNORE_INDEX])
        if class_pixels.tolist() != split_index.class_pixels or ignore_pixels != split_index.ignore_pixels:
            raise IncompleteDatasetError(f"{root}: split {name} pixel histogram differs from {INDEX_FILE}")
    log.info(
        "%s: valid (%s)", root, ", ".join(f"{k} {v.num_samples}" for k, v in dataset.index.splits.items())
    )
    return dataset.index
