"""One job per output folder: `<out>/.wanrender.lock` names the host, pid and job that hold the folder.

Two jobs on one folder would both render every shot and write into the same logs. The lock is created with
O_CREAT|O_EXCL (atomic on local and NFSv3+ file systems); a second submission waits for it (job.lock_wait_s)
or is refused with the holder's name. A lock whose owner is gone — same host, pid no longer running — is stale
(a job killed with SIGKILL, a rebooted machine) and is taken over with a notice. A lock from another host cannot
be checked from here, so it is never taken over: the message says how to remove it by hand.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".wanrender.lock"


class FolderLocked(RuntimeError):
    """The output folder is held by another job (the message names it and the ways out)."""


@dataclass
class Holder:
    host: str
    pid: int
    job: str
    since: str

    def describe(self) -> str:
        return f"job {self.job!r} (host {self.host}, pid {self.pid}, since {self.since})"


def _read(path: Path) -> Holder | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return Holder(str(d["host"]), int(d["pid"]), str(d.get("job", "?")), str(d.get("since", "?")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder("?", -1, "unreadable lock file", "?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(holder: Holder) -> bool:
    return holder.host == socket.gethostname() and holder.pid > 0 and not _alive(holder.pid)


class FolderLock:
    """with FolderLock(out, job="seq010"): ...  — released on exit (also on Ctrl-C and errors)."""

    def __init__(self, folder: str | Path, job: str, wait_s: float = 0.0, poll_s: float = 1.0, notice=print):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.job = job
        self.wait_s = float(wait_s)
        self.poll_s = poll_s
        self.notice = notice
        self.held = False
        self.waited = False  # True when another job held the folder first (its outputs may have changed)

    def _try_create(self) -> bool:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": self.job,
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return True

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        announced = False
        while True:
            if self._try_create():
                self.held = True
                return self
            holder = _read(self.path)
            if holder is None:
                continue  # released between our two calls: try again at once
            if is_stale(holder):
                self.notice(f"note: taking over the stale lock of {holder.describe()}: that process is gone")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            if time.monotonic() >= deadline:
                raise FolderLocked(
                    f"output folder {self.folder} is in use by {holder.describe()}: wait for it to finish "
                    f"(job.lock_wait_s=SECONDS waits), or choose another out=. If that job is gone, remove "
                    f"{self.path}")
            self.waited = True
            if not announced:
                self.notice(f"waiting up to {self.wait_s:g}s for {holder.describe()} to release {self.folder}")
                announced = True
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def release(self) -> None:
        if not self.held:
            return
        holder = _read(self.path)
        if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
