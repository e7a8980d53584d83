"""Drain actuators: how a node is taken out of service and put back.

The controller and people only mark a node drained in the store; the node's agent
calls its actuator when the mark changes. Each actuator says whether a drain also
powers the node down (standby, suspend), because only then does a drain save the
node's host power, and the controller budgets a drained node by that.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class DrainError(Exception):
    """The actuator could not drain or resume the node; the message says why."""


class DrainActuator(Protocol):
    powers_down: bool

    def set_drained(self, drained: bool) -> None: ...


class DrainNowActuator(DrainActuator, Protocol):
    """One that can also end a drain at once (``can_drain_now``): the requests still in
    flight on the node go back to the router (their clients retry them elsewhere)
    instead of finishing there while the node draws power."""

    can_drain_now: bool

    def drain_now(self) -> None: ...


class CommandDrain:
    """Runs a command template to drain and one to resume: Slurm's
    ``scontrol update NodeName={node} State=DRAIN Reason=wattkeeper`` and
    ``scontrol update NodeName={node} State=RESUME``, Kubernetes' ``kubectl cordon
    {node}`` and ``kubectl uncordon {node}``, or a site script. ``{node}`` is replaced
    by the node's name; the command runs without a shell.

    ``drain_now`` (optional) ends a drain at once, after the drain command ran:
    ``kubectl drain {node} --ignore-daemonsets --force --grace-period=0``, or a site
    script that restarts the node's inference servers (their clients retry elsewhere)."""

    def __init__(
        self,
        node: str,
        drain: Sequence[str] | str,
        resume: Sequence[str] | str,
        *,
        powers_down: bool = False,
        timeout_s: float = 30.0,
        drain_now: Sequence[str] | str | None = None,
    ) -> None:
        self.node = node
        self.drain = _argv(drain)
        self.resume = _argv(resume)
        self.now = None if drain_now is None else _argv(drain_now)
        self.can_drain_now = self.now is not None
        self.powers_down = powers_down
        self.timeout_s = timeout_s

    def set_drained(self, drained: bool) -> None:
        self._run(self.drain if drained else self.resume)

    def drain_now(self) -> None:
        if self.now is None:
            raise DrainError("no drain-now command configured (agent.drain_now_command)")
        self._run(self.now)

    def _run(self, template: list[str]) -> None:
        argv = [part.replace("{node}", self.node) for part in template]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DrainError(f"{shlex.join(argv)}: {exc}") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise DrainError(
                f"{shlex.join(argv)} exited {done.returncode}"
                + (f": {detail[-1]}" if detail else "")
            )


def _argv(command: Sequence[str] | str) -> list[str]:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ValueError("a drain command cannot be empty")
    return argv
