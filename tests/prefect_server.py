"""A real ``prefect server start`` (and worker) on loopback for tests: started, checked healthy, stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, url: str, **more: str) -> dict[str, str]:
    """The environment of a Prefect client, server or worker of the tests (``home`` is created)."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        **more,
    }


def deployment_env(root: Path, url: str, **more: str) -> dict[str, str]:
    """``prefect_env`` for a server, a worker and `prefect deploy` of the tests under ``root``: the worker
    polls every second (not every 10 s), flow results go to ``root/results``, and the Kubernetes
    deployments' image variable (read by `prefect deploy`) is set."""
    return prefect_env(
        root / "prefect-home",
        url,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(root / "results"),
        VITADAPTER_IMAGE="registry.example.org/vitadapter:test",
        **more,
    )


# what Prefect's own client retries: the server answers 503 for an error a client may retry (a database
# timeout, sqlite busy under load), 429 and 502 likewise; any other status is the answer
RETRIED_STATUSES = (429, 502, 503)
RETRY_DELAYS_S = (0.5, 1, 2, 4, 8)


def api(url: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 10) -> Any:
    """GET ``path`` of the Prefect API at ``url`` (POST ``body`` when given); the decoded JSON answer.

    A 429/502/503 answer is retried after 0.5, 1, 2, 4 and 8 s, as Prefect's client does; the last one is
    raised."""
    for delay in (*RETRY_DELAYS_S, None):
        request = urllib.request.Request(
            f"{url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code not in RETRIED_STATUSES or delay is None:
                raise
        time.sleep(delay)
    raise AssertionError("unreachable")


def api30(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """``api`` with 30 s per request: the deployment tests' server registers pools and renders jobs
    while other tests load the machine."""
    return api(url, path, body, timeout=30)


def start_server(
    url: str,
    env: dict[str, str],
    log: Path,
    *,
    timeout_s: float = SERVER_START_TIMEOUT_S,
    request_timeout: float = 10,
) -> subprocess.Popen[bytes]:
    """``prefect server start`` on the port of ``url``, in a session of its own, healthy when this returns
    (within ``timeout_s``, each health request given ``request_timeout`` seconds)."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    with log.open("ab") as out:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if api(url, "/health", timeout=request_timeout) is True:
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    stop(server)
    pytest.fail(f"prefect server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the process group of ``process`` (started with ``start_new_session``) and reap it."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        process.wait(timeout=60)


def stop(process: subprocess.Popen[bytes], grace_s: float = 20) -> None:
    """SIGTERM the process group we started, then SIGKILL what is left after ``grace_s`` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
