"""Pretrained weight files: found locally, or downloaded (with a sha256 check) when a network exists.

A weight is looked up as ``<weights_dir>/<file>`` (the file names of docs/reference.md §R2.2, e.g.
``deit_tiny_patch16_224-a1311bcf.pth``). When it is missing it is downloaded from its URL to a
temporary file and renamed into place; offline, the error names the file, its URL and where to put
it. Every file is verified by content (:func:`resolve_weights`): against an explicit sha256, the digest
recorded in ``<weights_dir>/SHA256SUMS.json``, or the hash prefix in its name (``name-<hex>.pth``, the
torch.hub convention of the DeiT releases). The published digests of the BEiT/BEiTv2/AugReg files and the
release zips are not reachable from here: their digest is recorded on first use (trust on first use) and
every later use is checked against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from tqdm import tqdm

from data.atomic import atomic_write, file_sha256, write_json_atomic
from pipelines.config.params import DEFAULT_PATHS

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path(DEFAULT_PATHS.weights)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.(?:pth|pt|pth\.tar)$")
_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 30


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained file is neither present nor downloadable; the message says what to do."""


LEDGER = "SHA256SUMS.json"


def _ledger(weights_dir: Path) -> dict[str, str]:
    path = weights_dir / LEDGER
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a JSON object of file name -> sha256 ({err}); fix or delete it"
        ) from err


def _record(weights_dir: Path, file: str, digest: str) -> None:
    """Trust on first use: the published digests are not reachable from here, so the first verified-by-name or
    first downloaded copy's sha256 is recorded in ``SHA256SUMS.json`` and every later use is checked against it."""
    ledger = _ledger(weights_dir)
    if ledger.get(file) != digest:
        ledger[file] = digest
        write_json_atomic(weights_dir / LEDGER, dict(sorted(ledger.items())))
        log.info(
            "recorded sha256 %s of %s in %s (checked on every later use)", digest, file, weights_dir / LEDGER
        )


def _expected(path: Path, expected: str | None, ledger: dict[str, str]) -> str | None:
    if expected is not None:
        return expected.lower()
    if path.name in ledger:
        return ledger[path.name]
    match = _HASH_IN_NAME.search(path.name)
    return match.group(1) if match else None


def check_hash(path: Path, expected: str | None = None) -> str:
    """sha256 of ``path``, checked against ``expected`` or the hash prefix in the file name.

    Raises:
        ValueError: the digest does not match, naming the file and both values.
    """
    digest = file_sha256(path)
    wanted = _expected(path, expected, {})
    if wanted is not None and not digest.startswith(wanted):
        raise ValueError(
            f"{path}: sha256 {digest} does not match the expected {wanted} (corrupt or wrong file?)"
        )
    return digest


def _download(url: str, target: Path, expected: str | None) -> str:
    """Download ``url`` to a temporary name beside ``target``, verify it, then rename; returns the sha256."""
    digest = hashlib.sha256()

    def write(out: IO[bytes]) -> None:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if expected is not None and not digest.hexdigest().startswith(expected):
            raise ValueError(
                f"{url}: the download's sha256 {digest.hexdigest()} does not match the expected {expected}; "
                f"nothing was written to {target}"
            )

    atomic_write(target, write)
    return digest.hexdigest()


def resolve_weights(
    file: str,
    url: str | None,
    *,
    weights_dir: str | os.PathLike[str] = DEFAULT_WEIGHTS_DIR,
    path: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    download: bool = True,
) -> tuple[Path, str]:
    """The local path of a weight file and its full sha256, verified by content.

    A file is checked against, in order: ``sha256`` when given, the digest ``SHA256SUMS.json`` in
    ``weights_dir`` recorded for its name, the hash prefix in its name (``name-<hex>.pth``). A download goes
    to a temporary name and is renamed into place only once verified; a file with no known digest is
    recorded on first use and checked against that record afterwards.

    Args:
        file: the expected file name.
        url: where it is published.
        weights_dir: folder the file is looked up in and downloaded to.
        path: an explicit file (used as is, never downloaded; checked against ``sha256`` or its name).
        sha256: expected digest (full or a prefix).
        download: try the URL when the file is missing.

    Raises:
        WeightsNotFoundError: missing and not downloadable (offline), naming the file, URL and folder.
        ValueError: hash mismatch, naming the file and both digests.
    """
    if path is not None:
        explicit = Path(path)
        if not explicit.is_file():
            raise WeightsNotFoundError(f"pretrained file {explicit} does not exist")
        return explicit, check_hash(explicit, sha256)
    folder = Path(weights_dir)
    target = folder / file
    expected = _expected(target, sha256, _ledger(folder))
    if target.is_file():
        digest = file_sha256(target)
        if expected is not None and not digest.startswith(expected):
            raise ValueError(
                f"{target}: sha256 {digest} does not match the expected {expected} (recorded in "
                f"{folder / LEDGER} or given); the file was changed or is corrupt: delete it to download it again"
            )
    else:
        if not (download and url):
            raise WeightsNotFoundError(
                f"pretrained file {file} is missing: download {url or '(no URL known)'} and put it at {target}"
            )
        log.info("downloading %s to %s", url, target)
        try:
            digest = _download(url, target, expected)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise WeightsNotFoundError(
                f"pretrained file {file} is missing and could not be downloaded ({err}); "
                f"download {url} on a machine with network access and put it at {target}"
            ) from err
    _record(folder, file, digest)
    return target, digest
