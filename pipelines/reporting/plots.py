"""DVC plots that render offline.

``dvc plots show`` writes HTML whose ``{scripts}`` placeholder dvc-render fills with ``<script src=...>``
tags pointing at a CDN, so offline the page stays blank. Here the same vega, vega-lite and vega-embed
builds (the versions dvc-render pins) are fetched once from the npm registry (``npm pack``) and
inlined into an HTML template without that placeholder; ``dvc plots show --html-template`` with it
gives a self-contained page.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from data.atomic import write_text_atomic
from pipelines.config.params import DEFAULT_PATHS

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(DEFAULT_PATHS.plots) / "offline_template.html"
# package -> the file of its npm tarball that the browser loads
BUILD_FILES = {
    "vega": "package/build/vega.min.js",
    "vega-lite": "package/build/vega-lite.min.js",
    "vega-embed": "package/build/vega-embed.min.js",
}
ESCAPED_END = "<\\/script>"
_CDN_SCRIPT = re.compile(r"cdn\.jsdelivr\.net/npm/(vega(?:-lite|-embed)?)@([0-9.]+)")
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>ViT-Adapter training curves</title>
    INLINE_SCRIPTS
    <style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def pinned_versions() -> dict[str, str]:
    """The vega package versions dvc-render loads from its CDN."""
    from dvc_render.vega import VegaRenderer

    versions = dict(_CDN_SCRIPT.findall(VegaRenderer.SCRIPTS))
    missing = set(BUILD_FILES) - set(versions)
    if missing:
        raise RuntimeError(f"cannot find the pinned versions of {sorted(missing)} in dvc-render's scripts")
    return versions


def build_offline_template(path: Path = DEFAULT_TEMPLATE, *, npm: str = "npm") -> Path:
    """Write the self-contained template (fetching the packages with ``npm pack`` if needed).

    Raises:
        RuntimeError: npm is missing or the registry cannot be reached, naming what to do.
    """
    if path.is_file():
        return path
    if shutil.which(npm) is None:
        raise RuntimeError(f"{npm} is not installed: it is needed once to fetch vega for offline plots")
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for package, version in pinned_versions().items():
            spec = f"{package}@{version}"
            result = subprocess.run(
                [npm, "pack", spec, "--pack-destination", tmp, "--silent"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if result.returncode != 0:
                raise RuntimeError(f"npm pack {spec} failed: {result.stderr.strip()[-500:]}")
            tarball = Path(tmp) / result.stdout.strip().splitlines()[-1]
            with tarfile.open(tarball) as archive:
                member = archive.extractfile(BUILD_FILES[package])
                if member is None:
                    raise RuntimeError(f"{tarball.name} has no {BUILD_FILES[package]}")
                code = member.read().decode("utf-8")
            # "</script>" inside the code would end the inline element early
            safe = code.replace("</script>", ESCAPED_END)
            scripts.append(f"<script>/* {spec} */\n{safe}\n</script>")
    page = PAGE.replace("{{", "{").replace("}}", "}").replace("INLINE_SCRIPTS", "\n".join(scripts))
    write_text_atomic(path, page)
    log.info("wrote the offline plots template %s", path)
    return path


def show_plots(out: Path, *, template: Path = DEFAULT_TEMPLATE, dvc: str = "dvc") -> Path:
    """``dvc plots show`` with the offline template; returns the HTML file."""
    build_offline_template(template)
    subprocess.run(
        [dvc, "plots", "show", "--html-template", str(template.resolve()), "-o", str(out)], check=True
    )
    return out / "index.html"
