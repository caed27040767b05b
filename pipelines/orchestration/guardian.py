"""A training started by an orchestrator stops with a checkpoint when the orchestrator goes away.

A Prefect process worker that is stopped (Ctrl-C, ``systemctl stop``, a container stop) ends its flow-run
processes with SIGTERM and, a moment later, SIGKILL: a training inside the flow-run process would lose every
iteration since its last checkpoint. So the flow's train task runs the training in a child process of its
own session (out of reach of the worker's signals to the flow run's process group), with this module on
both sides:

* the parent (:func:`run_guarded`) names itself in the child's environment (``VITADAPTER_GUARDIAN``: its
  PID, its start time, so that a reused PID is not mistaken for it, and a stop file), forwards the child's
  output line by line (to the flow run's log), and, when it is itself interrupted (Ctrl-C, a cancelled flow
  run), asks the child to stop through the stop file and waits for its checkpoint;
* the child (:func:`watch`, every rank of a ``torchrun`` training) polls the parent once a second and sends
  itself SIGTERM, once, when the parent is gone or asks it to stop: the trainer finishes the iteration,
  writes a checkpoint and exits 143, and rerunning the flow (or the deployment) resumes from it;
* the child's error, when it fails, is written to a failure file (:func:`record_failure`) so that the parent
  raises it with its own message and kind (:class:`TrainingProcessError`), not as a bare exit status.

A Prefect server that stops answering is another matter: the flow-run process lives on (its API calls are
retried, then fail), so the training goes on to its end; see README, "Prefect".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.atomic import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

GUARDIAN_ENV = "VITADAPTER_GUARDIAN"
FAILURE_ENV = "VITADAPTER_FAILURE_FILE"
POLL_INTERVAL_S = 1.0
# how long an interrupted parent waits for the child's checkpoint before it gives up waiting
STOP_WAIT_S = 600.0


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class Guardian:
    """The process a training belongs to, as the training's environment names it.

    Attributes:
        pid: its process id.
        start: its start time (:func:`process_start_time`), None where ``/proc`` is missing.
        stop_file: the file whose existence asks the training to stop.
    """

    pid: int
    start: str | None
    stop_file: Path

    @classmethod
    def of_this_process(cls, stop_file: Path) -> Guardian:
        return cls(os.getpid(), process_start_time(os.getpid()), stop_file)

    def token(self) -> str:
        """The environment value (``pid:start:stop file``)."""
        return f"{self.pid}:{self.start or ''}:{self.stop_file}"

    @classmethod
    def from_token(cls, token: str) -> Guardian:
        """The guardian of an environment value.

        Raises:
            ValueError: not a value :meth:`token` wrote, naming it.
        """
        pid, sep, rest = token.partition(":")
        start, sep2, stop_file = rest.partition(":")
        if not (sep and sep2 and pid.isdigit() and stop_file):
            raise ValueError(f"{GUARDIAN_ENV}={token!r}: expected PID:START:STOP_FILE")
        return cls(int(pid), start or None, Path(stop_file))

    def alive(self) -> bool:
        """Whether the guardian still runs (the same process, not a later one with its PID)."""
        if self.start is not None:
            return process_start_time(self.pid) == self.start
        return _pid_exists(self.pid)

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def request_stop(self, reason: str) -> None:
        write_text_atomic(self.stop_file, reason + "\n")


def watch(
    environ: Mapping[str, str] = os.environ, *, interval_s: float = POLL_INTERVAL_S
) -> threading.Thread | None:
    """In a training process: stop it with a checkpoint when the process that started it is gone.

    A daemon thread polls the guardian named in ``environ`` and sends this process one SIGTERM (the trainer's
    graceful stop: finish the iteration, write a checkpoint, exit 143) when the guardian has died or asks for
    a stop; never a second one (a second SIGTERM stops the trainer without a checkpoint).

    Returns:
        The thread, or None when no guardian is named (a training started by hand).
    """
    token = environ.get(GUARDIAN_ENV)
    if not token:
        return None
    guardian = Guardian.from_token(token)

    def loop() -> None:
        while guardian.alive() and not guardian.stop_requested():
            time.sleep(interval_s)
        if guardian.stop_requested():
            reason = guardian.stop_file.read_text().strip() if guardian.stop_file.is_file() else "asked to"
            log.warning("the flow run that started this training asks it to stop (%s)", reason)
        else:
            log.warning(
                "the process that started this training (PID %d, the flow run) is gone: stopping after this "
                "iteration with a checkpoint; rerun the flow or the deployment to resume",
                guardian.pid,
            )
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=loop, name="vitadapter-guardian", daemon=True)
    thread.start()
    return thread


# -- failures, from the child to the parent ------------------------------------------------------------


class TrainingProcessError(RuntimeError):
    """The training child process failed; the message is its own error.

    Attributes:
        kinds: the class names of the child's exception and its bases (``RunFolderBusyError``,
            ``RuntimeError``, ...); empty when it recorded none (a crash, a failed ``torchrun`` launch).
        returncode: the child's exit status.
        signum: the signal that stopped the training (SIGTERM, SIGINT) after its checkpoint, else None.
    """

    def __init__(self, message: str, *, kinds: Sequence[str] = (), returncode: int = 1) -> None:
        super().__init__(message)
        self.kinds = tuple(kinds)
        self.returncode = returncode
        self.signum = returncode - 128 if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM) else None


def record_failure(error: BaseException, environ: Mapping[str, str] = os.environ) -> None:
    """In the child: write ``error`` to the failure file its parent named (nothing when none is named)."""
    path = environ.get(FAILURE_ENV)
    if not path or environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return
    kinds = [cls.__name__ for cls in type(error).__mro__ if cls not in (object, BaseException)]
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    with contextlib.suppress(OSError):  # a full disk must not hide the error itself
        write_json_atomic(Path(path), {"kinds": kinds, "message": message or type(error).__name__})


def _read_failure(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


# -- the parent ------------------------------------------------------------------------------------------


def run_guarded(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    on_output: Callable[[str], None] | None = None,
    stop_wait_s: float = STOP_WAIT_S,
) -> None:
    """Run a training ``command`` as a guarded child (see the module docstring) and wait for it.

    Args:
        command: the child's command line.
        env: its environment (default: this process's), to which the guardian and failure file are added.
        on_output: called with each line the child writes to stdout or stderr (default: logged here).
        stop_wait_s: how long to wait for the child's checkpoint after this process is interrupted.

    Raises:
        TrainingProcessError: the child failed: its recorded error, else its exit status.
        BaseException: whatever interrupted the wait (after the child was asked to stop and has stopped).
    """
    forward = on_output or (lambda line: log.info("%s", line))
    with tempfile.TemporaryDirectory(prefix="vitadapter-train-") as scratch:
        guardian = Guardian.of_this_process(Path(scratch) / "stop")
        failure_file = Path(scratch) / "failure.json"
        child_env = {**(env if env is not None else os.environ), GUARDIAN_ENV: guardian.token()}
        child_env[FAILURE_ENV] = str(failure_file)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        process = subprocess.Popen(
            list(command),
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # out of reach of signals to this process's group (a stopped worker)
        )
        reader = threading.Thread(target=_forward_lines, args=(process, forward), daemon=True)
        reader.start()
        try:
            returncode = process.wait()
        except BaseException as interrupt:
            guardian.request_stop(f"{type(interrupt).__name__}: {interrupt}".rstrip(": "))
            log.warning("asked the training (PID %d) to stop with a checkpoint; waiting for it", process.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=stop_wait_s)
            raise
        finally:
            reader.join(timeout=5)
        if returncode == 0:
            return
        record = _read_failure(failure_file)
        if record is not None:
            raise TrainingProcessError(
                str(record["message"]), kinds=record.get("kinds", ()), returncode=returncode
            )
        raise TrainingProcessError(
            f"the training process ({' '.join(command[:6])} ...) exited with status {returncode}",
            returncode=returncode,
        )


def _forward_lines(process: subprocess.Popen[str], forward: Callable[[str], None]) -> None:
    if process.stdout is None:  # not opened as a pipe: nothing to forward
        return
    for line in process.stdout:
        with contextlib.suppress(Exception):  # a failing log handler must not stop the draining
            forward(line.rstrip("\n"))
