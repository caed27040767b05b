"""Pretrained weight files: found locally, or downloaded (with a sha256 check) when a network exists.

A weight is looked up as ``<weights_dir>/<file>`` (the file names of recipes.yaml, e.g.
``deit_tiny_patch16_224-a1311bcf.pth``). When it is missing it is downloaded from its URL to a
temporary file and renamed into place; offline, the error names the file, its URL and where to put
it. The sha256 of every file used is returned for the run's key report; files whose name carries a
hash prefix (``name-<hex>.pth``, the torch.hub convention of the DeiT releases) are checked against it,
and an expected sha256 can be given explicitly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path("artifacts/pretrained")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.(?:pth|pt|pth\.tar)$")
_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 30


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained file is neither present nor downloadable; the message says what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(path: Path, expected: str | None = None) -> str:
    """sha256 of ``path``, checked against ``expected`` or the hash prefix in the file name.

    Raises:
        ValueError: the digest does not match, naming the file and both values.
    """
    digest = sha256_of(path)
    wanted = expected
    if wanted is None:
        match = _HASH_IN_NAME.search(path.name)
        wanted = match.group(1) if match else None
    if wanted is not None and not digest.startswith(wanted.lower()):
        raise ValueError(
            f"{path}: sha256 {digest} does not match the expected {wanted} (corrupt or wrong file?)"
        )
    return digest


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_weights(
    file: str,
    url: str | None,
    *,
    weights_dir: str | os.PathLike[str] = DEFAULT_WEIGHTS_DIR,
    path: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    download: bool = True,
) -> tuple[Path, str]:
    """The local path of a weight file and its sha256.

    Args:
        file: the expected file name.
        url: where it is published.
        weights_dir: folder the file is looked up in and downloaded to.
        path: an explicit file (used as is, never downloaded).
        sha256: expected digest (full or a prefix).
        download: try the URL when the file is missing.

    Raises:
        WeightsNotFoundError: missing and not downloadable (offline), naming the file, URL and folder.
        ValueError: hash mismatch.
    """
    if path is not None:
        explicit = Path(path)
        if not explicit.is_file():
            raise WeightsNotFoundError(f"pretrained file {explicit} does not exist")
        return explicit, check_hash(explicit, sha256)
    target = Path(weights_dir) / file
    if not target.is_file():
        if not (download and url):
            raise WeightsNotFoundError(
                f"pretrained file {file} is missing: download {url or '(no URL known)'} and put it at {target}"
            )
        log.info("downloading %s to %s", url, target)
        try:
            _download(url, target)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise WeightsNotFoundError(
                f"pretrained file {file} is missing and could not be downloaded ({err}); "
                f"download {url} on a machine with network access and put it at {target}"
            ) from err
    return target, check_hash(target, sha256)
