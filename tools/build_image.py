"""Build the vitadapter image with buildah and smoke-test it inside (``make image`` runs this).

1. The base: ``--base IMAGE`` when given; else the Dockerfile's default (``python:3.11-slim``) when it
   is present or can be pulled; else a local Debian bookworm base with its python3.11, made with
   ``debootstrap --variant=minbase`` from apt's Debian mirror and committed as
   ``localhost/vitadapter-base:bookworm-python3.11`` (made once, reused after).
2. ``buildah bud --isolation chroot`` of the repository's ``Dockerfile``. ``--wheels DIR`` puts DIR's
   wheels into the build context (``deploy/image/build-extras/``, removed again afterwards), where pip
   takes them before PyPI's: e.g. a CPU build of torch 2.13.0 instead of the CUDA one (a GPU image: leave
   it out); ``--pip-cert FILE`` (default ``$PIP_CERT``) the certificates pip trusts there (a
   TLS-inspecting proxy's). Both serve the build stage only.
3. The smoke test, with ``buildah run --isolation chroot`` in a container of the new image and a host
   folder mounted on ``/opt/vitadapter/artifacts``: the image's configuration (non-root user, entry point,
   volume), nothing but ``params.yaml`` in its working folder, ``vitadapter --version``,
   ``vitadapter configs list``, a Kubernetes pod's entry command (``vitadapter flow node -- prefect
   version``), the flows' module and prefect-kubernetes importing, and two training iterations of the
   tiny preset on a synthetic ADE20K twin (synthesize, prepare, train), whose checkpoint and logs must
   appear in the host folder.

It ends with one line naming the image, its size and the build time, and writes the same as JSON to
``WORK/image-report.json``. Needs root (buildah's chroot isolation, debootstrap) and, for a fresh base,
Debian's mirror; the builds need PyPI. Exit status 1 with a one-line reason when a step fails::

    sudo apt-get install -y buildah debootstrap
    python3 tools/build_image.py --wheels /opt/wheels      # here: the CPU torch wheel on disk
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TAG = "localhost/vitadapter:0.1.0"
DEFAULT_BASE = "docker.io/library/python:3.11-slim"
LOCAL_BASE = "localhost/vitadapter-base:bookworm-python3.11"
CONTEXT_EXTRAS = REPO / "deploy" / "image" / "build-extras"
CONTEXT_CERT = CONTEXT_EXTRAS / "ca-bundle.crt"
# python3.11-venv needs python3-distutils on bookworm; ca-certificates for pip's TLS to PyPI
BASE_PACKAGES = ("python3.11", "python3.11-venv", "python3-distutils", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
PULL_TIMEOUT_S = 120
IMAGE_USER = "1000:1000"
SMOKE_ENTRY = "upernet_deit_adapter_tiny_512_160k_ade20k"
# inside the image, relative to its working folder /opt/vitadapter (artifacts/ is the mounted host folder)
SMOKE_STEPS: tuple[tuple[str, ...], ...] = (
    ("vitadapter", "--version"),
    ("vitadapter", "configs", "list"),
    # a Kubernetes pod's entry command (node 0 runs what follows --), and the module the k8s deployments
    # name, with the worker's package
    ("vitadapter", "flow", "node", "--", "prefect", "version"),
    ("python", "-c", "import prefect_kubernetes, pipelines.orchestration.flows"),
    (
        "vitadapter", "data", "synthesize", "ade20k", "--out", "artifacts/smoke/twin",
        "--num-train", "4", "--num-val", "2", "--min-size", "64", "--max-size", "96",
    ),
    ("vitadapter", "data", "prepare", "ade20k", "--raw", "artifacts/smoke/twin", "--out", "artifacts/smoke/shards"),
    (
        "vitadapter", "train", SMOKE_ENTRY, "--preset", "tiny", "--data", "artifacts/smoke/shards",
        "--work-dir", "artifacts/smoke/run", "--max-iters", "2", "--batch-size", "2", "--global-batch", "2",
        "--pretrained", "none", "--num-workers", "0", "--device", "cpu", "--eval-limit", "2",
        "--no-tracking", "--no-progress",
    ),
)  # fmt: skip

log = logging.getLogger("build_image")


class BuildError(RuntimeError):
    """A step failed; the message says which and why."""


def run(
    command: list[str], *, what: str, timeout: float | None = None, capture: bool = False, **kwargs
) -> str:
    """Run ``command``; its output goes to this terminal (or is returned with ``capture``).

    Raises:
        BuildError: it exited non-zero or ran past ``timeout``, naming ``what``.
    """
    log.debug("$ %s", " ".join(command))
    try:
        done = subprocess.run(
            command, check=False, timeout=timeout, text=True, capture_output=capture, **kwargs
        )
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: no result after {timeout:.0f} s ({' '.join(command[:3])} ...)") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip().splitlines()[-1:] if capture else []
        raise BuildError(
            f"{what}: {' '.join(command[:3])} ... exited {done.returncode} {' '.join(detail)}".strip()
        )
    return done.stdout if capture else ""


def image_exists(name: str) -> bool:
    return (
        subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0
    )


def debian_mirror() -> str:
    """The Debian mirror apt uses here (its deb822 ``URIs:`` or a ``deb URL bookworm`` line)."""
    for path in APT_SOURCES:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            match = re.match(r"\s*(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)/?(?:\s|$)", line)
            if match:
                return match.group(1)
    return DEFAULT_MIRROR


def make_local_base(work: Path, mirror: str) -> None:
    """A Debian bookworm root file system with python3.11, committed as :data:`LOCAL_BASE`."""
    rootfs = work / "base-rootfs"
    if rootfs.exists():  # a partial one from an interrupted run of this script
        shutil.rmtree(rootfs)
    log.info("making the base %s with debootstrap from %s (a few minutes)", LOCAL_BASE, mirror)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "bookworm",
            str(rootfs),
            mirror,
        ],
        what="debootstrap of Debian bookworm",
        capture=True,
    )
    # what apt downloaded stays out of the image (as in Docker's official slim images)
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / leftover).glob("*"):
            if path.is_file():
                path.unlink()
    container = run(["buildah", "from", "scratch"], what="buildah from scratch", capture=True).strip()
    try:
        mount = Path(run(["buildah", "mount", container], what="buildah mount", capture=True).strip())
        run(["cp", "-a", f"{rootfs}/.", f"{mount}/"], what="copying the root file system")
        run(["buildah", "umount", container], what="buildah umount")
        run(
            ["buildah", "config", "--env", "LANG=C.UTF-8", "--cmd", "/bin/sh",
             "--label", f"org.opencontainers.image.description=Debian bookworm minbase + {' '.join(BASE_PACKAGES)}",
             container],
            what="buildah config",
        )  # fmt: skip
        run(["buildah", "commit", "--quiet", container, LOCAL_BASE], what="buildah commit", capture=True)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
        shutil.rmtree(rootfs, ignore_errors=True)


def choose_base(requested: str | None, work: Path, mirror: str) -> str:
    """The base image to build on (see the module docstring)."""
    if requested:
        return requested
    if image_exists(DEFAULT_BASE):
        return DEFAULT_BASE
    log.info("pulling %s", DEFAULT_BASE)
    try:
        run(["buildah", "pull", "--quiet", DEFAULT_BASE], what="pull", timeout=PULL_TIMEOUT_S, capture=True)
        return DEFAULT_BASE
    except BuildError as error:
        log.warning("%s cannot be pulled (%s): building on a local Debian bookworm base", DEFAULT_BASE, error)
    if not image_exists(LOCAL_BASE):
        start = time.monotonic()
        make_local_base(work, mirror)
        log.info("base %s made in %.1f min", LOCAL_BASE, (time.monotonic() - start) / 60)
    else:
        log.info("reusing the local base %s", LOCAL_BASE)
    return LOCAL_BASE


def _place(source: Path, target: Path, added: list[Path]) -> None:
    if target.exists():  # a file someone put there: used as it is, and left there
        return
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)
    added.append(target)


def stage_extras(wheels: Path | None, cert: Path | None) -> list[Path]:
    """Link (or copy) ``wheels``' wheels and the ``cert`` bundle into the build context.

    Returns:
        The files this call added (removed again after the build).
    """
    added: list[Path] = []
    if wheels is not None:
        if not wheels.is_dir():
            raise BuildError(f"--wheels {wheels}: no such folder")
        for wheel in sorted(wheels.glob("*.whl")):
            _place(wheel, CONTEXT_EXTRAS / wheel.name, added)
    if cert is not None:
        if not cert.is_file():
            raise BuildError(f"--pip-cert {cert}: no such file")
        _place(cert, CONTEXT_CERT, added)
    log.info(
        "build context: %s in %s",
        ", ".join(p.name for p in added) or "nothing added",
        CONTEXT_EXTRAS.relative_to(REPO),
    )
    return added


def build(tag: str, base: str, log_file: Path) -> float:
    """``buildah bud`` of the Dockerfile; returns the seconds it took (its output also goes to ``log_file``)."""
    command = [
        "buildah", "bud", "--isolation", "chroot", "--layers", "--force-rm", "--pull=false",
        "--build-arg", f"BASE={base}", "-f", str(REPO / "Dockerfile"), "-t", tag, str(REPO),
    ]  # fmt: skip
    log.info("building %s on %s (log: %s)", tag, base, log_file)
    start = time.monotonic()
    with log_file.open("w", buffering=1) as out:  # line by line: the log shows where a build is
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None  # a pipe was asked for
        for line in process.stdout:
            out.write(line)
            if "STEP " in line or "error" in line.lower():
                log.info("  %s", line.rstrip())
        status = process.wait()
    if status != 0:
        raise BuildError(f"buildah bud exited {status}; the build's output is in {log_file}")
    return time.monotonic() - start


def image_config(tag: str) -> dict:
    text = run(["buildah", "inspect", "--type", "image", tag], what="buildah inspect", capture=True)
    return json.loads(text)


def image_size(tag: str) -> int:
    """The image's uncompressed size in bytes (its layers as stored).

    podman reports bytes; buildah alone reports a rounded text (``2.51 GB``, decimal units), parsed here.
    """
    if shutil.which("podman"):
        text = run(
            ["podman", "image", "inspect", "--format", "{{.Size}}", tag], what="podman inspect", capture=True
        )
        return int(text.strip())
    text = run(["buildah", "images", "--json", tag], what="buildah images", capture=True)
    entries = json.loads(text)
    if not entries:
        raise BuildError(f"buildah images: no image {tag}")
    match = re.fullmatch(r"([0-9.]+)\s*(B|kB|MB|GB|TB)", str(entries[0]["size"]).strip())
    if match is None:
        raise BuildError(f"buildah images: size {entries[0]['size']!r} of {tag} not understood")
    units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    return int(float(match.group(1)) * units[match.group(2)])


def check_config(info: dict) -> None:
    """The image's user, entry point, working folder and volume are the Dockerfile's."""
    config = info["OCIv1"]["config"]
    expected = {
        "User": IMAGE_USER,
        "Entrypoint": ["vitadapter"],
        "WorkingDir": "/opt/vitadapter",
    }
    for key, value in expected.items():
        if config.get(key) != value:
            raise BuildError(f"image config {key} is {config.get(key)!r}, expected {value!r}")
    if "/opt/vitadapter/artifacts" not in (config.get("Volumes") or {}):
        raise BuildError(f"image config Volumes {config.get('Volumes')!r} lacks /opt/vitadapter/artifacts")


def smoke_test(tag: str, results: Path) -> float:
    """Run :data:`SMOKE_STEPS` in a container of ``tag`` with ``results`` on artifacts/; returns seconds."""
    results.mkdir(parents=True, exist_ok=False)
    os.chown(results, 1000, 1000)  # the image's user writes there
    start = time.monotonic()
    container = run(["buildah", "from", "--pull=false", tag], what="buildah from", capture=True).strip()
    try:

        def inside(*command: str, volume: bool = True) -> str:
            options = ["--isolation", "chroot", "--workingdir", "/opt/vitadapter"]
            if volume:
                options += ["-v", f"{results}:/opt/vitadapter/artifacts:rw"]
            return run(
                ["buildah", "run", *options, container, "--", *command],
                what=f"smoke test `{' '.join(command[:4])}`",
                capture=True,
            )

        user = inside("id", "-u", volume=False).strip()
        if user != IMAGE_USER.split(":")[0]:
            raise BuildError(f"smoke test: the image runs as uid {user}, expected {IMAGE_USER}")
        contents = sorted(inside("find", ".", "-mindepth", "1", volume=False).split())
        if contents != ["./artifacts", "./metrics", "./params.yaml"]:
            raise BuildError(
                f"smoke test: /opt/vitadapter holds {contents}, expected params.yaml and empty folders"
            )
        outputs = []
        for step in SMOKE_STEPS:
            log.info("smoke test: %s", " ".join(step))
            outputs.append(inside(*step))
        if not outputs[0].startswith("vitadapter 0.1.0"):
            raise BuildError(f"smoke test: `vitadapter --version` printed {outputs[0]!r}")
        if "3.8.8" not in outputs[2]:
            raise BuildError(f"smoke test: `vitadapter flow node -- prefect version` printed {outputs[2]!r}")
        if SMOKE_ENTRY not in outputs[1]:
            raise BuildError(f"smoke test: `vitadapter configs list` does not list {SMOKE_ENTRY}")
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    run_dir = results / "smoke" / "run"
    iterations = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line]
    if not (run_dir / "iter_0000002.pth").is_file() or not iterations:
        raise BuildError(f"smoke test: no checkpoint of iteration 2 and training log in {run_dir}")
    if (run_dir / "iter_0000002.pth").stat().st_uid != 1000:
        raise BuildError("smoke test: the checkpoint was not written by the image's user (uid 1000)")
    return time.monotonic() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the vitadapter image with buildah (a local Debian base when no registry is "
        "reachable) and smoke-test it inside.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tag", default=DEFAULT_TAG, help="name of the image to build")
    parser.add_argument("--base", help=f"base image (default: {DEFAULT_BASE}, else {LOCAL_BASE})")
    parser.add_argument("--wheels", type=Path, help="folder of wheels pip takes first (e.g. a CPU torch)")
    parser.add_argument(
        "--pip-cert",
        type=Path,
        default=Path(os.environ["PIP_CERT"]) if os.environ.get("PIP_CERT") else None,
        help="CA bundle pip trusts in the build (default: $PIP_CERT)",
    )
    parser.add_argument("--work", type=Path, default=REPO / "build" / "image", help="logs, smoke results")
    parser.add_argument("--mirror", help="Debian mirror for debootstrap (default: apt's)")
    parser.add_argument("--no-smoke", action="store_true", help="build only")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every command")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if shutil.which("buildah") is None:
        log.error(
            "buildah not found: apt-get install -y buildah debootstrap (or docker build -t vitadapter .)"
        )
        return 1
    if os.geteuid() != 0:
        log.error("run as root: buildah's chroot isolation and debootstrap need it")
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    added: list[Path] = []
    try:
        base = choose_base(args.base, args.work, args.mirror or debian_mirror())
        added = stage_extras(args.wheels, args.pip_cert)
        seconds = build(args.tag, base, args.work / f"build-{stamp}.log")
        check_config(image_config(args.tag))
        size = image_size(args.tag)
        smoke = None if args.no_smoke else smoke_test(args.tag, args.work / f"smoke-{stamp}")
    except BuildError as error:
        log.error("%s", error)
        return 1
    finally:
        for path in added:
            path.unlink(missing_ok=True)
    report = {
        "image": args.tag,
        "base": base,
        "size_bytes": size,
        "build_seconds": round(seconds, 1),
        "smoke_seconds": None if smoke is None else round(smoke, 1),
        "cpus": os.cpu_count(),
        "wheels": str(args.wheels) if args.wheels else None,
    }
    report_file = args.work / "image-report.json"
    partial = report_file.with_suffix(".json.partial")  # written whole, then renamed: never half a report
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, report_file)
    smoke_text = "smoke test not run" if smoke is None else f"smoke test passed in {smoke:.0f} s"
    print(
        f"{args.tag}: {size / 1e9:.2f} GB on {base}, built in {seconds / 60:.1f} min "
        f"({os.cpu_count()} CPUs); {smoke_text}; report {report_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
