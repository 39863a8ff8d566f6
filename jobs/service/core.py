"""The submission service's logic, independent of HTTP: validate a submission exactly as `wanrender render` would,
admit it under the project quotas, hand it to Ray's job submission (the job's driver is `wanrender render`
on the cluster, with job.max_groups set to what was admitted), follow it, cancel it, and read its progress and
report from the farm's own files (<out>/progress.json while it runs, <out>/report.json at the end).

    submit -> validate (manifest + overrides; nothing reserved) -> record on disk (queued)
           -> quotas.admit -> Ray JobSubmissionClient.submit_job(submission_id = our job id) -> pending/running
           -> ended (succeeded / failed / stopped) | cancelled while queued
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.service.quotas import Demand, ProjectQuota, admit, refusal
from jobs.service.store import (ACTIVE, CANCELLED, FAILED, PENDING, QUEUED, RUNNING, STOPPED, SUBMITTING, SUCCEEDED,
                                TERMINAL, JobRecord, JobStore)

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
FORMATS = {"yaml": ".yaml", "json": ".json", "csv": ".csv"}
# what a submitter may not override: where outputs go, which cluster, how many groups (the quota decides)
FORBIDDEN_OVERRIDES = ("manifest", "out", "cluster", "dry_run", "job.output_root", "job.max_groups", "service",
                       "hydra")
STOP_WAIT_S = 60
HISTORY_KEPT = 50
RAY_STATES = {"PENDING": PENDING, "RUNNING": RUNNING, "SUCCEEDED": SUCCEEDED, "FAILED": FAILED, "STOPPED": STOPPED}


class ServiceError(Exception):
    """A request the service refuses: HTTP status, one message, and the manifest's problems if any."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.status, self.message, self.problems = status, message, problems or []


@dataclass
class ServiceSettings:
    state_dir: Path
    output_root: Path
    projects: dict[str, ProjectQuota]
    host: str = "127.0.0.1"
    port: int = 8642
    poll_s: float = 2.0
    render_overrides: list[str] = field(default_factory=list)  # before each job's own (e.g. render.device=cpu)
    ray_address: str | None = None  # the dashboard / job server (http://HOST:8265); None: an embedded cluster
    cluster_gpus: int | None = None  # None: ask the embedded cluster


def settings_from_config(cfg) -> ServiceSettings:
    from omegaconf import OmegaConf

    s = OmegaConf.to_container(cfg.service, resolve=True)
    quotas = s.get("projects") or {}
    if s.get("projects_file"):  # a studio keeps its quotas in one file: it replaces the inline projects
        import yaml

        try:
            quotas = yaml.safe_load(Path(s["projects_file"]).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"service.projects_file: cannot read {s['projects_file']}: {e}") from None
        if not isinstance(quotas, dict):
            raise ValueError(f"service.projects_file {s['projects_file']}: must map project names to "
                             f"{{guaranteed_gpus, burst_gpus, priority}}")
    projects = {str(name): ProjectQuota.from_dict(str(name), q or {}) for name, q in quotas.items()}
    return ServiceSettings(state_dir=Path(s["state_dir"]), output_root=Path(s["output_root"]), projects=projects,
                           host=str(s["host"]), port=int(s["port"]), poll_s=float(s["poll_s"]),
                           render_overrides=list(s.get("render_overrides") or []), ray_address=s.get("ray_address"),
                           cluster_gpus=s.get("cluster_gpus"))


def check_overrides(overrides: list[str]) -> list[str]:
    problems = []
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if "=" not in o or not key or key[0] in "+~":
            problems.append(f"override {o!r}: use KEY=VALUE for a key the config has (e.g. job.max_retries=3)")
        elif any(key == f or key.startswith(f + ".") for f in FORBIDDEN_OVERRIDES):
            problems.append(f"override {o!r}: {key} is set by the service (outputs, cluster, groups); remove it "
                            f"and ask for `groups` in the request instead of job.max_groups")
    return problems


class JobService:
    def __init__(self, settings: ServiceSettings, client: Any, cluster_gpus: int):
        self.s = settings
        self.client = client  # ray.job_submission.JobSubmissionClient (or anything with its four methods)
        self.cluster_gpus = cluster_gpus
        self.store = JobStore(settings.state_dir)
        self.lock = self.store.lock
        self._validate_lock = threading.Lock()  # Hydra's compose is process-global: one at a time
        self.refresh()  # a restarted service catches up with what Ray did meanwhile

    # -- submission -------------------------------------------------------------------------------------------------
    def submit(self, project: str, key: str, manifest: str, fmt: str = "yaml", overrides: list[str] | None = None,
               groups: int = 1, priority: int = 0) -> tuple[JobRecord, bool]:
        """(record, created): the same project + idempotency key returns the job it created the first time."""
        overrides = list(overrides or [])
        if not KEY_RE.match(key or ""):
            raise ServiceError(400, "the Idempotency-Key header is required: 1-128 characters of A-Z a-z 0-9 . _ : -")
        if fmt not in FORMATS:
            raise ServiceError(422, f"format {fmt!r}: use one of {', '.join(FORMATS)}")
        request_hash = hashlib.sha256(json.dumps([project, manifest, fmt, overrides, groups, priority])
                                      .encode()).hexdigest()
        with self.lock:
            old = self.store.by_key(project, key)
        if old is not None:
            if old.request_hash != request_hash:
                raise ServiceError(409, f"idempotency key {key!r} was used for job {old.id} with a different "
                                        f"request; use a new key for a new job")
            return old, False
        if project not in self.s.projects:  # before any work: the cheapest refusal
            raise ServiceError(403, refusal(Demand("-", project, 1), self.s.projects, self.cluster_gpus))
        problems = check_overrides(overrides)
        if problems:
            raise ServiceError(422, "bad overrides", problems)
        job_id = f"wr-{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}"
        manifest_path = self.store.manifest_path(job_id, FORMATS[fmt])
        manifest_path.write_text(manifest, encoding="utf-8")
        out_dir = self.s.output_root / project / job_id
        try:
            plan = self._validate(manifest_path, out_dir, overrides, groups)
        except ServiceError:
            manifest_path.unlink(missing_ok=True)
            raise
        rec = JobRecord(id=job_id, project=project, idempotency_key=key, request_hash=request_hash,
                        name=plan.manifest.name, manifest_path=str(manifest_path), out_dir=str(out_dir),
                        overrides=overrides, groups=groups, gpus_per_group=plan.gpus_per_group, priority=priority,
                        shots=len(plan.shots), submitted_at=time.time())
        why = refusal(self._demand(rec), self.s.projects, self.cluster_gpus)
        if why:
            manifest_path.unlink(missing_ok=True)
            raise ServiceError(403, f"refused: {why}")
        with self.lock:
            again = self.store.by_key(project, key)  # a concurrent twin got here first: same answer as above
            if again is not None:
                manifest_path.unlink(missing_ok=True)
                if again.request_hash != request_hash:
                    raise ServiceError(409, f"idempotency key {key!r} was used for job {again.id} with a "
                                            f"different request; use a new key for a new job")
                return again, False
            self._set(rec, QUEUED, "waiting for the quota check")
            self.dispatch()
        return rec, True

    def _validate(self, manifest_path: Path, out_dir: Path, overrides: list[str], groups: int):
        """Exactly `wanrender render`'s checks (jobs.farm.prepare): every problem at once, nothing reserved."""
        from jobs.farm import prepare
        from jobs.manifest import ManifestError
        from renderer.conf import compose

        with self._validate_lock:
            try:
                cfg = compose(self._job_overrides(manifest_path, out_dir, overrides, groups))
            except Exception as e:  # Hydra names the bad override
                raise ServiceError(422, f"bad overrides: {' '.join(str(e).split())}") from None
            try:
                plan, _ = prepare(cfg)
            except ManifestError as e:
                raise ServiceError(422, f"the manifest has {len(e.problems)} problem(s); nothing was submitted",
                                   [str(p) for p in e.problems]) from None
        return plan

    def _job_overrides(self, manifest_path: Path, out_dir: Path, overrides: list[str], groups: int) -> list[str]:
        return [f"manifest={manifest_path}", f"out={out_dir}", *self.s.render_overrides, *overrides,
                f"job.max_groups={groups}", "job.live_progress=false"]

    @staticmethod
    def _demand(rec: JobRecord) -> Demand:
        return Demand(rec.id, rec.project, rec.gpus, rec.priority, rec.submitted_at)

    def _set(self, rec: JobRecord, state: str, reason: str | None) -> None:
        if rec.state != state or rec.reason != reason or rec.id not in self.store.jobs:
            rec.history.append({"at": round(time.time(), 3), "state": state, "reason": reason})
            del rec.history[:-HISTORY_KEPT]  # a job retried against a sick job server must not grow forever
            rec.state, rec.reason = state, reason
            if state in TERMINAL and rec.ended_at is None:
                rec.ended_at = time.time()
            self.store.save(rec)

    # -- scheduling onto Ray ----------------------------------------------------------------------------------------
    def dispatch(self) -> None:
        """Start every queued job the quotas allow (see jobs/service/quotas.py), in their order."""
        with self.lock:
            jobs = list(self.store.jobs.values())
            running = [self._demand(j) for j in jobs if j.state in ACTIVE]
            waiting = [self._demand(j) for j in jobs if j.state == QUEUED]
            start, why = admit(waiting, running, self.s.projects, self.cluster_gpus)
            for job_id, reason in why.items():
                self._set(self.store.jobs[job_id], QUEUED, reason)
            for job_id in start:
                self._launch(self.store.jobs[job_id])

    def _launch(self, rec: JobRecord) -> None:
        self._set(rec, SUBMITTING, None)  # on disk before Ray hears of it: a crash here is caught by refresh()
        argv = [sys.executable, "-m", "renderer.cli", "render",
                *self._job_overrides(Path(rec.manifest_path), Path(rec.out_dir), rec.overrides, rec.groups),
                "cluster=ray", "cluster.address=auto"]
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
               # cancel = Ctrl-C for the driver (ray.init turns SIGTERM into a bare exit): it ends its groups and
               # writes the report, with this long before Ray kills it
               "RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}
        try:
            self.client.submit_job(entrypoint=shlex.join(argv), submission_id=rec.id,
                                   runtime_env={"env_vars": env},
                                   metadata={"wanrender_project": rec.project, "wanrender_name": rec.name})
        except Exception as e:
            text = " ".join(str(e).split())[:400]
            if "already exists" in text:  # submitted before a restart: Ray has it, follow it
                pass
            elif "status code 4" in text:  # Ray refused the request itself: retrying would not help
                self._set(rec, FAILED, f"Ray job submission refused it: {text}")
                return
            else:  # the job server is unreachable or failing: keep the job queued, the poller tries again
                self._set(rec, QUEUED, f"Ray's job server did not take it ({text}); trying again")
                return
        rec.started_at = time.time()
        self._set(rec, PENDING, None)

    def refresh(self) -> None:
        """Follow every job that holds GPUs through Ray's status; then start what the freed quota allows."""
        with self.lock:
            active = [j for j in self.store.jobs.values() if j.state in ACTIVE]
        for rec in active:
            try:
                info = self.client.get_job_info(rec.id)
            except Exception as e:
                unknown = "does not exist" in str(e).lower() or "404" in str(e)
                with self.lock:
                    if unknown and rec.state == SUBMITTING:  # stopped between recording and submitting
                        self._set(rec, QUEUED, "submitted again after a service restart")
                    elif unknown:
                        self._set(rec, FAILED, "Ray no longer knows this job (was the cluster restarted?); "
                                               "resubmit with a new idempotency key")
                continue  # otherwise the job server is unreachable for now: keep the last known state
            state = RAY_STATES.get(str(getattr(info.status, "value", info.status)), rec.state)
            with self.lock:
                rec.ray_message = info.message
                reason = rec.reason if state not in TERMINAL else (
                    "cancelled by request" if state == STOPPED else None if state == SUCCEEDED
                    else f"the job's driver failed: {(info.message or '').splitlines()[0][:300]}")
                if state == FAILED and Path(rec.out_dir, "report.json").is_file():
                    reason = "some shots failed: see the report"
                self._set(rec, state, reason)
        self.dispatch()

    # -- reading ----------------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        rec = self.store.jobs.get(job_id)
        if rec is None:
            raise ServiceError(404, f"no job {job_id!r} on this service")
        return rec

    def list(self, project: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            jobs = sorted(self.store.jobs.values(), key=lambda j: j.submitted_at)
            return [j.public() for j in jobs if project is None or j.project == project]

    def status(self, job_id: str) -> dict[str, Any]:
        """The job, and per shot: status, attempts, GPU-seconds and (running shots) an ETA, from the farm's files."""
        rec = self.get(job_id)
        out = {**rec.public(), "shots_status": None, "counts": {}, "eta_s": None, "gpu_seconds": None,
               "report": Path(rec.out_dir, "report.json").is_file()}
        now = time.time()
        report = _read_json(Path(rec.out_dir) / "report.json")
        if report and (report.get("job") or {}).get("running"):
            report = None  # the farm's start-of-job report (dashboard link, shots queued): progress.json is fresher
        if report:  # final: the report is the truth
            out["shots_status"] = [{"id": s["id"], "status": s["status"], "attempts": s["attempt_count"],
                                    "gpu_seconds": s.get("gpu_seconds"), "error": s.get("error"), "eta_s": 0.0}
                                   for s in report["shots"]]
            out["counts"], out["eta_s"] = report["counts"], 0.0
            out["gpu_seconds"] = (report.get("accounting") or {}).get("gpu_seconds")
        progress = None if report else _read_json(Path(rec.out_dir) / "progress.json")
        if progress:
            age = max(0.0, now - progress["updated_at"])
            shots = []
            for sid, s in progress["shots"].items():
                eta = None
                if s["status"] == "running" and s.get("started_at"):
                    eta = round(max(0.0, s["estimate_s"] - (now - s["started_at"])), 1)
                elif s["status"] in ("done", "skipped", "failed", "not_started"):
                    eta = 0.0
                shots.append({"id": sid, "status": s["status"], "attempts": s["attempts"],
                              "gpu_seconds": s["gpu_seconds"], "error": s.get("error"), "eta_s": eta})
            out.update(shots_status=shots, counts=progress["counts"], gpu_seconds=progress["gpu_seconds"],
                       eta_s=round(max(0.0, progress["eta_s"] - age), 1))
        done = sum(1 for s in out["shots_status"] or [] if s["status"] in ("done", "skipped"))
        out["progress"] = round(done / rec.shots, 4) if rec.shots else 1.0
        return out

    def report_file(self, job_id: str, name: str) -> Path:
        rec = self.get(job_id)
        path = Path(rec.out_dir) / name
        if not path.is_file():
            raise ServiceError(404, f"job {job_id} has no {name} yet (state {rec.state}); the farm writes it when "
                                    f"the job ends")
        return path

    def logs(self, job_id: str, tail_chars: int = 100_000) -> str:
        """The job driver's output (plan, events, progress lines), as Ray kept it."""
        rec = self.get(job_id)
        if rec.state in (QUEUED, CANCELLED, SUBMITTING):
            return f"job {job_id} has not started ({rec.state}: {rec.reason or '-'})\n"
        try:
            return self.client.get_job_logs(rec.id)[-tail_chars:]
        except Exception as e:
            raise ServiceError(502, f"Ray has no logs for job {job_id}: {' '.join(str(e).split())[:300]}")

    # -- cancel -----------------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobRecord:
        with self.lock:
            rec = self.get(job_id)
            if rec.state in TERMINAL:
                raise ServiceError(409, f"job {job_id} already ended ({rec.state})")
            if rec.state == QUEUED:
                self._set(rec, CANCELLED, "cancelled by request before it started")
                self.dispatch()
                return rec
        try:
            self.client.stop_job(rec.id)  # SIGTERM to the driver: it ends its groups and writes the report
        except Exception as e:
            raise ServiceError(502, f"Ray could not stop job {job_id}: {' '.join(str(e).split())[:300]}")
        with self.lock:
            self._set(rec, rec.state, "cancel requested")
        return rec

    def close(self) -> None:
        self.store.close()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
