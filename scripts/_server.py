"""A `colgrid serve` child process for the fault and load scripts: start it on a free loopback
port, wait until it serves, read its memory, and end it politely (SIGTERM) or not (SIGKILL).

The server is a real subprocess, never an in-process thread: SIGKILL must take the whole process
down at an arbitrary instruction, as an OOM killer or a lost node would.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

READY_LINE = re.compile(r"colgrid serving on (\S+):(\d+)")
# The `colgrid` command line as a module, so the child runs the interpreter running us.
COLGRID = (sys.executable, "-m", "colgrid_server.cli")


class ServerDied(RuntimeError):
    """The server exited (or never became ready) when it should be serving."""


def colgrid_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a colgrid child: offline model hubs, no COLGRID_* from the caller
    (a developer's own settings must not leak into a trial), then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLGRID_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    target: str
    log_path: Path
    started_s: float  # seconds from spawn until it printed its ready line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)

    def kill(self) -> bool:
        """SIGKILL now; True if it was still running (so the kill interrupted it)."""
        return kill_now(self.proc)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM (the server drains and leaves the replica list), SIGKILL after grace_s."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def kill_now(proc: subprocess.Popen) -> bool:
    """SIGKILL `proc`; True if it was still running when the signal went out."""
    was_alive = proc.poll() is None
    if was_alive:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # exited between poll and kill
            was_alive = False
    proc.wait(30)
    return was_alive


def start_server(data_dir: Path, log_path: Path, *, settings: Mapping[str, str] | None = None,
                 timeout_s: float = 120.0) -> ServerProcess:
    """`colgrid serve --data-dir data_dir` on 127.0.0.1 and a free port; returns once the server
    has loaded its stable versions and printed its ready line. `settings`: COLGRID_* variables
    (e.g. {"COLGRID_REGISTRY_POLL_SECONDS": "0.2"}). stdout and stderr go to log_path, which
    this server has to itself (it is truncated)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*COLGRID, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                                 "--port", "0"], stdout=log, stderr=subprocess.STDOUT,
                                env=colgrid_env(settings), start_new_session=True)
    while True:
        text = log_path.read_text(errors="replace")
        if (match := READY_LINE.search(text)) and proc.poll() is None:
            host, port = match.groups()
            return ServerProcess(proc, f"{host}:{port}", log_path, time.monotonic() - began)
        if proc.poll() is not None or time.monotonic() - began > timeout_s:
            kill_now(proc)
            raise ServerDied(f"colgrid serve (status {proc.returncode}) did not serve within {timeout_s:.0f}s; "
                             f"log {log_path}:\n" + "\n".join(text.splitlines()[-20:]))
        time.sleep(0.02)


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (psutil if installed, else /proc/<pid>/status)."""
    try:
        import psutil  # optional: not a colgrid dependency

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"no VmRSS for pid {pid}")
