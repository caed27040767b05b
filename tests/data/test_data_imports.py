"""Import rules of ``data``: the catalog and the transforms import no torch; webdataset lives in one module."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import data

TORCH_FREE = (
    "data.catalog",
    "data.readers",
    "data.synthetic",
    "data.shards",
    "data.prepare",
    "data.train_transforms",
    "data.eval_transforms",
)
WEBDATASET_IMPORT = re.compile(r"^\s*(import|from)\s+(webdataset|wids)\b", re.MULTILINE)


def test_catalog_readers_shards_and_transforms_import_no_torch() -> None:
    code = f"import sys, {', '.join(TORCH_FREE)}; print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_webdataset_is_imported_only_by_the_shard_module() -> None:
    importers = sorted(
        path.name
        for path in Path(data.__file__).parent.glob("*.py")
        if WEBDATASET_IMPORT.search(path.read_text())
    )
    assert importers == ["shards.py"]
