"""Screenshots of the MLflow UI as a person opens it, taken in a real headless Chromium, with checks of what
they must show.

It starts ``mlflow server`` on loopback over a tracking store (default: the demo's ``sqlite:///mlflow.db``),
opens the addresses the pipeline prints (the runs table in our saved view, a training run's page, its model
charts, the reference experiment) and writes PNGs. Each page is checked for the words it must show, the
runs table for the column headers total loss / validation mIoU / SS-MS mIoU / published SS-MS mIoU without
any column added by hand; a missing one is an error naming it (exit status 1).

Needs Chromium (Debian: ``apt-get install chromium``) and the ``playwright`` package (in the test extras; it
drives the system's Chromium, it downloads no browser)::

    make demo
    .venv/bin/python tools/mlflow_screenshots.py --out docs/screenshots
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.reporting.mlflow_views import runs_table_url

# what each page must show (the runs table: the column headers of our saved view)
RUNS_TABLE_WORDS = ("train/loss", "val/mIoU", "ss_mIoU", "published_ss_mIoU", "ms_mIoU", "published_ms_mIoU")
# the summary table at the top, and the training split among the dataset inputs ("ade20k/train")
RUN_PAGE_WORDS = ("total loss", "validation mIoU", "SS mIoU", "published", "/train")
REFERENCE_WORDS = ("ss_mIoU", "ms_mIoU", "params_M")
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class ScreenshotError(RuntimeError):
    """A page did not show what it must (or the server or browser did not start)."""


@dataclass(frozen=True)
class Page:
    file: str
    url: str
    words: tuple[str, ...]


def find_chromium(given: str | None) -> str:
    for candidate in (given, os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ScreenshotError(
        "no Chromium found: install it (Debian: apt-get install chromium) or pass --chromium PATH"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(tracking_uri: str, port: int, log_file: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.is_file() else "mlflow", "server", "--backend-store-uri", tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log_file.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ScreenshotError(f"mlflow server exited ({server.returncode}); see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise ScreenshotError(f"mlflow server did not answer on port {port} within 120 s; see {log_file}")


def pages(tracking_uri: str, ui: str, experiment: str, reference: str) -> list[Page]:
    """The pages to take: our runs table, the newest training run's page and charts, the reference rows."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    ours = client.get_experiment_by_name(experiment)
    if ours is None:
        raise ScreenshotError(f"{tracking_uri} has no experiment {experiment!r} (run `make demo` first)")
    trained = client.search_runs(
        [ours.experiment_id],
        "tags.`vitadapter.kind` = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    result = [Page("runs_table.png", runs_table_url(ui, ours.experiment_id), RUNS_TABLE_WORDS)]
    if trained:
        run = f"{ui}/#/experiments/{ours.experiment_id}/runs/{trained[0].info.run_id}"
        result.append(Page("run_page.png", f"{run}?workflowType=machine_learning", RUN_PAGE_WORDS))
        result.append(
            Page("run_charts.png", f"{run}/model-metrics?workflowType=machine_learning", ("train/loss",))
        )
    else:
        raise ScreenshotError(f"experiment {experiment!r} holds no training run (tag vitadapter.kind=train)")
    ref = client.get_experiment_by_name(reference)
    if ref is not None:
        result.append(Page("reference_table.png", runs_table_url(ui, ref.experiment_id), REFERENCE_WORDS))
    return result


def compact(path: Path) -> None:
    """Re-save a screenshot as a 256-colour PNG (a UI page loses nothing visible; the file is 3-4x smaller)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256)
    small.save(path, optimize=True)


def take(chromium: str, shots: list[Page], out: Path, *, width: int, height: int, wait_s: float) -> list[str]:
    """Open each page, wait for its words, take the picture; returns what was missing (page: word)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    missing: list[str] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as driver:
        browser = driver.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=list(CHROMIUM_FLAGS),
            viewport={"width": width, "height": height},
        )
        page = browser.new_page()
        for shot in shots:
            page.goto(shot.url)
            with contextlib.suppress(PlaywrightTimeout):  # a word not shown is reported below
                page.get_by_text(shot.words[0], exact=False).first.wait_for(timeout=wait_s * 1000)
            page.wait_for_timeout(1500)  # charts and tables finish drawing
            close = page.locator("[aria-label='Close']")  # the assistant side panel of a first visit
            if close.count():
                try:
                    close.last.click(timeout=2000)
                    page.wait_for_timeout(500)
                except PlaywrightTimeout:
                    pass
            text = page.inner_text("body")
            missing += [f"{shot.file}: {word!r}" for word in shot.words if word not in text]
            page.screenshot(path=str(out / shot.file))
            compact(out / shot.file)
            print(f"wrote {out / shot.file}  ({shot.url})")
        browser.close()
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tracking-uri", default="sqlite:///mlflow.db", help="store to serve (default the demo's)"
    )
    parser.add_argument("--experiment", default="vitadapter", help="our experiment (default vitadapter)")
    parser.add_argument("--reference-experiment", default="vitadapter-reference")
    parser.add_argument(
        "--out", default="docs/screenshots", help="folder of the PNGs (default docs/screenshots)"
    )
    parser.add_argument(
        "--chromium", help="Chromium executable (default: $CHROMIUM, /usr/bin/chromium, PATH)"
    )
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for a page's words (default 60)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        chromium = find_chromium(args.chromium)
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        server = start_server(args.tracking_uri, port, out / "mlflow-server.log")
        try:
            ui = f"http://127.0.0.1:{port}"
            shots = pages(args.tracking_uri, ui, args.experiment, args.reference_experiment)
            missing = take(chromium, shots, out, width=args.width, height=args.height, wait_s=args.wait)
        finally:
            server.terminate()
            server.wait(timeout=30)
        (out / "mlflow-server.log").unlink(missing_ok=True)
    except ScreenshotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if missing:
        print("error: not shown: " + "; ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
