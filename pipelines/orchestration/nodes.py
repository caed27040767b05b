"""The pods of a vitadapter Kubernetes job: node 0 runs the flow run, the others join its torchrun launches.

The Kubernetes work pool (``deploy/kubernetes/base-job-template.json``) submits each flow run as an
Indexed Job of ``nodes`` pods; each pod runs ``vitadapter flow node -- prefect flow-run execute`` with
``NODE_RANK`` (its completion index), ``MASTER_ADDR`` (pod 0's name under the headless Service),
``MASTER_PORT``, and ``VITADAPTER_GPUS`` / ``VITADAPTER_NODES`` (the pod's size, which every run of the
params file then takes, :data:`pipelines.config.params.LAUNCH_ENVS`).

Node 0 executes the flow run: its train tasks launch ``torchrun --nnodes N --node-rank 0
--rdzv-endpoint MASTER_ADDR:MASTER_PORT`` (:func:`pipelines.orchestration.stages.torchrun_command`).
Every other node follows the flow run through the Prefect API (:func:`follow`): while a train task run
(``train-<run>``) is running it runs the same command with its own node rank, launched again if it ends
in failure while that attempt still runs (pod 0's rendezvous may not be up yet); a launch still waiting
when the attempt has ended is stopped; a retried attempt is joined afresh. When the flow run has ended
the node exits 0: the flow run's state is node 0's to report.

The c10d rendezvous ignores ``--node-rank``: torchrun numbers the nodes by their host names, and pod 0's
(``<job>-0``) sorts first, so pod 0 is node 0 and its first process global rank 0, the one that reports.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.config.params import load_params
from pipelines.orchestration import stages

log = logging.getLogger(__name__)

NODE_RANK_ENV = "NODE_RANK"
FLOW_RUN_ID_ENV = "PREFECT__FLOW_RUN_ID"  # set by every Prefect worker in the job's environment
TRAIN_TASK_PREFIX = "train-"  # the train task's run name is train-<run> (flows.train_task)
POLL_S = 5.0
RELAUNCH_DELAY_S = 10.0
# how long a launch may outlive its attempt before it is stopped (torchrun's own shutdown takes seconds)
STOP_GRACE_S = 60.0
# Prefect API calls that fail in a row before a node gives up (at POLL_S: 10 minutes)
MAX_BLIND_POLLS = 120


@dataclass(frozen=True)
class TrainAttempt:
    """One attempt of a train task run (a retry is a new attempt of the same task run)."""

    task_run_id: str
    run: str
    attempt: int
    running: bool

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_run_id, self.attempt)


@dataclass(frozen=True)
class FlowRunView:
    """What a following node needs to know of the flow run."""

    params_file: str
    finished: bool
    attempts: tuple[TrainAttempt, ...]

    def running(self, key: tuple[str, int]) -> bool:
        return not self.finished and any(a.key == key and a.running for a in self.attempts)


# observe() returns None when the Prefect API could not be asked (that poll is skipped)
Observe = Callable[[], FlowRunView | None]


def node_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This pod's node rank (``NODE_RANK``; 0 when unset, a single-pod job).

    Raises:
        ValueError: ``NODE_RANK`` is not a non-negative integer, naming it.
    """
    text = environ.get(NODE_RANK_ENV, "").strip() or "0"
    if not text.isdigit():
        raise ValueError(f"{NODE_RANK_ENV}={text!r}: not a non-negative integer (the pod's completion index)")
    return int(text)


def follower_command(params_file: str, run: str) -> list[str]:
    """The torchrun command node 0 runs for ``run``, with this node's rank (the same function makes both)."""
    return stages.torchrun_command(Path(params_file), run, load_params(params_file).run(run))


def _next_attempt(view: FlowRunView, joined: set[tuple[str, int]]) -> TrainAttempt | None:
    return next((a for a in view.attempts if a.running and a.key not in joined), None)


class Follower:
    """Follows a flow run from a node other than 0 (see the module docstring).

    Args:
        observe: the flow run now (None when the API could not be asked).
        command_for: the torchrun command of ``(params_file, run)``.
        poll_s, relaunch_delay_s, stop_grace_s: seconds between polls, before a relaunch, and that a
            launch may outlive its attempt.
    """

    def __init__(
        self,
        observe: Observe,
        command_for: Callable[[str, str], list[str]] = follower_command,
        *,
        poll_s: float = POLL_S,
        relaunch_delay_s: float = RELAUNCH_DELAY_S,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.observe = observe
        self.command_for = command_for
        self.poll_s = poll_s
        self.relaunch_delay_s = relaunch_delay_s
        self.stop_grace_s = stop_grace_s
        self.blind_polls = 0
        self.last: FlowRunView | None = None

    def view(self) -> FlowRunView:
        """The flow run now, or the last one seen when the API does not answer.

        Raises:
            RuntimeError: the API did not answer :data:`MAX_BLIND_POLLS` times in a row.
        """
        while True:
            view = self.observe()
            if view is not None:
                self.blind_polls, self.last = 0, view
                return view
            self.blind_polls += 1
            if self.blind_polls >= MAX_BLIND_POLLS:
                raise RuntimeError(f"the Prefect API did not answer {self.blind_polls} times in a row")
            if self.last is not None:
                return self.last
            time.sleep(self.poll_s)

    def run(self) -> int:
        """Join every train attempt of the flow run until it ends; returns the exit status (0)."""
        joined: set[tuple[str, int]] = set()
        while True:
            view = self.view()
            if view.finished:
                log.info("the flow run has ended: this node is done")
                return 0
            attempt = _next_attempt(view, joined)
            if attempt is None:
                time.sleep(self.poll_s)
                continue
            joined.add(attempt.key)
            self.join(attempt, view.params_file)

    def join(self, attempt: TrainAttempt, params_file: str) -> None:
        """Run the attempt's torchrun command here while the attempt runs (see the module docstring)."""
        command = self.command_for(params_file, attempt.run)
        launches = 0
        while True:
            launches += 1
            log.info(
                "run %s, attempt %d: launch %d: %s", attempt.run, attempt.attempt, launches, " ".join(command)
            )
            process = subprocess.Popen(command)
            status = self._wait(process, attempt.key)
            if status == 0:
                log.info(
                    "run %s, attempt %d: this node's training has finished", attempt.run, attempt.attempt
                )
                return
            if not self.view().running(attempt.key):
                log.info(
                    "run %s, attempt %d has ended (this node's launch: status %s)",
                    attempt.run,
                    attempt.attempt,
                    status,
                )
                return
            log.warning(
                "run %s: this node's launch ended with status %s; again in %.0f s",
                attempt.run,
                status,
                self.relaunch_delay_s,
            )
            time.sleep(self.relaunch_delay_s)

    def _wait(self, process: subprocess.Popen, key: tuple[str, int]) -> int:
        """The launch's exit status; stops it when it outlives its attempt by :attr:`stop_grace_s`."""
        ended_at: float | None = None
        while True:
            try:
                return process.wait(timeout=self.poll_s)
            except subprocess.TimeoutExpired:
                pass
            if self.view().running(key):
                ended_at = None
                continue
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at >= self.stop_grace_s:
                log.warning("the attempt has ended but this node's launch runs on: stopping it")
                process.terminate()
                try:
                    return process.wait(timeout=self.stop_grace_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    return process.wait()
