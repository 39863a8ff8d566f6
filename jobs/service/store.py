"""The service's state on disk: one JSON file per job under <state_dir>/jobs/, written atomically, so a restarted
service knows every job it accepted (and the Ray job behind it). One service per state folder: a lock file
(fcntl, released when the process dies) refuses a second one.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

QUEUED, SUBMITTING = "queued", "submitting"  # ours: waiting for quota / being handed to Ray
PENDING, RUNNING = "pending", "running"  # Ray's: the driver is starting / running
SUCCEEDED, FAILED, STOPPED, CANCELLED = "succeeded", "failed", "stopped", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, STOPPED, CANCELLED)
ACTIVE = (SUBMITTING, PENDING, RUNNING)  # holding (or about to hold) GPUs


@dataclass
class JobRecord:
    id: str  # also the Ray job's submission id
    project: str
    idempotency_key: str
    request_hash: str  # what was asked (manifest + options): the same key with another request is a conflict
    name: str
    manifest_path: str
    out_dir: str
    overrides: list[str]
    groups: int
    gpus_per_group: int
    priority: int
    shots: int
    submitted_at: float
    state: str = QUEUED
    reason: str | None = None  # why it waits, why it failed, who cancelled it
    started_at: float | None = None
    ended_at: float | None = None
    ray_message: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return self.groups * self.gpus_per_group

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("request_hash")
        d["gpus"] = self.gpus
        return d


class JobStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        (self.dir / "jobs").mkdir(parents=True, exist_ok=True)
        (self.dir / "manifests").mkdir(exist_ok=True)
        self._lock_file = open(self.dir / "service.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            owner = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            raise RuntimeError(f"state folder {self.dir} is in use by another wanrender service ({owner}); "
                               f"stop it or use another service.state_dir") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._lock_file.flush()
        self.lock = threading.RLock()  # the HTTP workers and the poller share the records
        self.jobs: dict[str, JobRecord] = {}
        for p in sorted((self.dir / "jobs").glob("*.json")):
            rec = JobRecord(**json.loads(p.read_text(encoding="utf-8")))
            self.jobs[rec.id] = rec

    def by_key(self, project: str, key: str) -> JobRecord | None:
        return next((j for j in self.jobs.values() if j.project == project and j.idempotency_key == key), None)

    def save(self, rec: JobRecord) -> None:
        from renderer.video_io import write_json_atomic

        self.jobs[rec.id] = rec
        write_json_atomic(self.dir / "jobs" / f"{rec.id}.json", asdict(rec))

    def manifest_path(self, job_id: str, suffix: str) -> Path:
        return self.dir / "manifests" / f"{job_id}{suffix}"

    def close(self) -> None:
        if not self._lock_file.closed:
            self._lock_file.close()
