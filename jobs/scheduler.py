"""The driver's scheduling loop: render groups pull shots from one priority queue; failures are retried.

    queue (priority) --> idle group --> render refs --> done | failed
                                                        failed: group killed + replaced, shot back in the queue
                                                                (until job.max_retries), node failure counted
                                                                (job.node_failure_limit -> node blocklisted)

A group that is busy longer than job.shot_timeout_s is killed and its shot retried. Every failure is classified
(jobs/faults.py): the shot's own settings are not retried, an environment fault (disk full, read-only folder,
missing binary) stops the job, a lost group (preemption) is retried without counting against job.max_retries,
and a render error is retried up to job.max_retries. Nothing already written
is touched: outputs land atomically from the rank that rendered them, and a killed group can at worst leave a
hidden temp file, which the driver removes.
"""
from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from jobs.animate_shots import task_fields
from jobs.faults import ENVIRONMENT, FIXES, INPUT, PREEMPTION, classify
from jobs.group import GroupHandle
from jobs.plan import Plan, PlannedShot, ShotQueue
from jobs.progress import JobProgress


@dataclass
class FarmSettings:
    gpus_per_group: int = 1
    use_gpus: bool = True
    max_groups: int | None = None
    max_retries: int = 2
    shot_timeout_s: float = 3600.0
    group_start_timeout_s: float = 900.0
    node_failure_limit: int = 2
    max_preemptions: int = 5  # lost groups a shot may suffer beyond max_retries (jobs/faults.py)
    worker_spec: dict[str, Any] = field(default_factory=dict)
    faults: dict[tuple[str, int], dict] = field(default_factory=dict)  # (shot id, attempt) -> fault (tests)
    job_meta: dict[str, Any] = field(default_factory=dict)  # copied into every sidecar under "job"
    budget_gpu_hours: float | None = None  # job.budget_gpu_hours: no new shot starts once this much is spent
    progress_every_s: float = 1.0  # <out>/progress.json is rewritten at most this often (the service reads it)


@dataclass
class ShotRecord:
    shot: PlannedShot
    status: str  # skipped | queued | running | done | failed | not_started (budget reached)
    attempts: list[dict] = field(default_factory=list)
    error: str | None = None
    result: dict | None = None
    attempt_base: int = 0  # attempts made by earlier submissions (their logs are kept, numbering continues)
    failure_class: str | None = None  # input | environment | preemption | render (jobs/faults.py), when failed

    def budget_used(self) -> int:
        """Failed attempts that count against job.max_retries: preemptions do not (up to max_preemptions)."""
        return sum(1 for a in self.attempts if a.get("status") == "failed" and a.get("class") != PREEMPTION)

    def preemptions(self) -> int:
        return sum(1 for a in self.attempts if a.get("class") == PREEMPTION)

    @property
    def gpu_seconds(self) -> float:
        """Group size × wall time of every attempt of this job, failed and running ones included."""
        return sum(attempt_gpu_seconds(a) for a in self.attempts)


def attempt_gpu_seconds(attempt: dict, now: float | None = None) -> float:
    """A finished attempt's recorded GPU-seconds, or a running one's so far (its GPUs are held the whole time)."""
    if "gpu_seconds" in attempt:
        return float(attempt["gpu_seconds"])
    return attempt.get("gpus", 1) * max(0.0, (now or time.time()) - attempt["started_at"])


def close_attempt(attempt: dict, status: str, **extra: Any) -> None:
    """End an attempt: its wall time and GPU-seconds are fixed from here on."""
    ended = time.time()
    wall = max(0.0, ended - attempt["started_at"])
    attempt.update(ended_at=ended, wall_s=round(wall, 3), gpu_seconds=round(attempt.get("gpus", 1) * wall, 3),
                   status=status, **extra)


def earlier_attempts(log_dir: Path, shot_id: str) -> int:
    pattern = re.compile(rf"^{re.escape(shot_id)}\.attempt(\d+)\.log$")
    numbers = [int(m.group(1)) for p in log_dir.glob(f"{shot_id}.attempt*.log") if (m := pattern.match(p.name))]
    return max(numbers, default=0)


def short_error(e: BaseException) -> str:
    """One readable line for the report: the cause inside a Ray task error, not Ray's wrapper text."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    last = text[-1] if text else ""
    name = type(cause).__name__
    if "ActorDied" in name or "RayActorError" in name or "actor died" in str(e).lower():
        return "render group lost (actor or node died)"
    return f"{name}: {last}"[:500]


class Farm:
    def __init__(self, plan: Plan, settings: FarmSettings, progress: JobProgress | None = None,
                 group_factory: Callable[..., GroupHandle] = GroupHandle):
        self.plan = plan
        self.s = settings
        self.out_dir = plan.out_dir
        self.log_dir = plan.out_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.records = {p.id: ShotRecord(p, "skipped" if p.done else "queued",
                                         attempt_base=earlier_attempts(self.log_dir, p.id)) for p in plan.shots}
        self.queue = ShotQueue(plan.todo)
        self.groups: dict[str, GroupHandle] = {}
        self.refs: dict[Any, tuple[str, str, int]] = {}  # ObjectRef -> (group id, "setup" | "render", rank)
        # node -> what failed there (shot ids, or "start:<group>"): the same shot failing twice on one node is
        # more likely the shot's fault than the node's, so it counts once
        self.node_failed: dict[str, set[str]] = collections.defaultdict(set)
        self.blocklist: set[str] = set()
        self.group_failures_in_a_row = 0
        self.retries = 0
        self.next_gid = 0
        self.progress = progress or JobProgress(len(plan.todo), len(plan.done), live=False)
        self.events: list[str] = []
        self.speed = 1.0  # measured seconds / estimated seconds, for the ETA
        self.stopped: str | None = None  # why the job stopped early (an environment fault), with the fix
        self._warned_solo = False
        self.group_factory = group_factory  # benchmarks pass a stub group; the scheduling is this code either way
        self.budget_reached = False
        self._progress_written = 0.0

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def _event(self, msg: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {msg}")
        self.progress.event(msg)

    def _count(self, status: str) -> int:
        return sum(1 for r in self.records.values() if r.status == status)

    def _update_progress(self) -> None:
        busy = [g for g in self.groups.values() if g.state == "busy"]
        active = max(1, len([g for g in self.groups.values() if g.state != "dead"]))
        left = sum(self.records[i].shot.estimate_s for i in self.queue.ids())
        left += sum(max(0.0, self.records[g.shot_id].shot.estimate_s * self.speed - (time.monotonic() -
                                                                                     g.shot_started)) for g in busy)
        eta = left * self.speed / active if (self.queue or busy) else 0.0
        self.progress.update(done=self._count("done"), running=len(busy), failed=self._count("failed"),
                             queued=len(self.queue), retries=self.retries, eta_s=eta)
        self._write_progress(eta)

    def gpu_seconds_spent(self) -> float:
        now = time.time()
        return sum(attempt_gpu_seconds(a, now) for r in self.records.values() for a in r.attempts)

    def _write_progress(self, eta_s: float, force: bool = False) -> None:
        """<out>/progress.json: per-shot status for anyone watching the job (the submission service)."""
        if not force and time.monotonic() - self._progress_written < self.s.progress_every_s:
            return
        self._progress_written = time.monotonic()
        from renderer.video_io import write_json_atomic

        now = time.time()
        shots = {r.shot.id: {"status": r.status, "attempts": len(r.attempts), "error": r.error,
                             "started_at": r.attempts[-1]["started_at"] if r.attempts else None,
                             "estimate_s": round(r.shot.estimate_s * self.speed, 1),
                             "gpu_seconds": round(sum(attempt_gpu_seconds(a, now) for a in r.attempts), 3)}
                 for r in self.records.values()}
        try:
            write_json_atomic(self.out_dir / "progress.json", {
                "updated_at": now, "eta_s": round(eta_s, 1), "counts": dict(self.progress.counts),
                "gpu_seconds": round(sum(s["gpu_seconds"] for s in shots.values()), 3),
                "budget_reached": self.budget_reached, "shots": shots})
        except OSError as e:  # watching is optional; rendering goes on
            self._event(f"note: progress.json not written: {e}")

    # -- capacity -------------------------------------------------------------------------------------------------
    def capacity(self) -> int:
        """Groups the healthy (alive, not blocklisted) nodes can hold, several per node when G is small."""
        total = 0
        for node in ray.nodes():
            if not node.get("Alive") or node["NodeID"] in self.blocklist:
                continue
            res = node.get("Resources", {})
            per_gpu = int(res.get("GPU", 0)) // self.s.gpus_per_group if self.s.use_gpus else 10**6
            total += min(per_gpu, int(res.get("CPU", 0)) // self.s.gpus_per_group)
        return total

    def _live_groups(self) -> list[GroupHandle]:
        return [g for g in self.groups.values() if g.state != "dead"]

    def ensure_groups(self) -> None:
        """Start groups until the queue's work, the cluster and job.max_groups are matched."""
        need = len(self.queue) + sum(1 for g in self.groups.values() if g.state == "busy")
        target = min(self.capacity(), need, self.s.max_groups or 10**6)
        while len(self._live_groups()) < target:
            gid = f"g{self.next_gid}"
            self.next_gid += 1
            g = self.group_factory(gid, self.s.gpus_per_group, self.s.use_gpus, self.s.worker_spec,
                            avoid_nodes=frozenset(self.blocklist))
            for rank, ref in enumerate(g.start()):
                self.refs[ref] = (gid, "setup", rank)
            self.groups[gid] = g
            self._event(f"group {gid}: starting ({g.size} rank{'s' if g.size > 1 else ''})")
        # a group idle with nothing left to do frees its GPUs for other jobs
        if not self.queue:
            for g in list(self.groups.values()):
                if g.state == "idle":
                    self._retire(g)

    def _retire(self, g: GroupHandle) -> None:
        g.kill()
        self._drop_refs(g.gid)
        del self.groups[g.gid]

    def _drop_refs(self, gid: str) -> None:
        for ref in [r for r, (owner, _, _) in self.refs.items() if owner == gid]:
            del self.refs[ref]

    # -- dispatch -------------------------------------------------------------------------------------------------
    def _check_budget(self) -> None:
        """job.budget_gpu_hours: once spent (running attempts count as they go), no new shot starts."""
        budget = self.s.budget_gpu_hours
        if budget is None or not self.queue or self.gpu_seconds_spent() < budget * 3600:
            return
        self.budget_reached = True
        why = (f"not started: job.budget_gpu_hours={budget:g} reached "
               f"({self.gpu_seconds_spent() / 3600:.4g} GPU-hours used)")
        ids = []
        while self.queue:
            rec = self.records[self.queue.pop().id]
            rec.status, rec.error = "not_started", why
            ids.append(rec.shot.id)
        self._event(f"budget reached: {len(ids)} shot(s) {why}: {', '.join(ids[:20])}"
                    + (f" … (+{len(ids) - 20})" if len(ids) > 20 else ""))

    def assign(self) -> None:
        self._check_budget()
        for g in list(self.groups.values()):
            if g.state == "idle" and g.node_id in self.blocklist:
                self._retire(g)  # a suspect node finishes what it runs but gets no new shot
                self._event(f"group {g.gid}: retired (its node is blocklisted)")
                continue
            if g.state != "idle" or not self.queue:
                continue
            shot = self.queue.pop()
            rec = self.records[shot.id]
            attempt = rec.attempt_base + len(rec.attempts) + 1
            task = {"shot": shot.spec, "output": shot.output, "quality": shot.tier, "attempt": attempt, "group": g.gid,
                    "out_dir": str(self.out_dir), "log": str(self.log_dir / f"{shot.id}.attempt{attempt}.log"),
                    "fault": self.s.faults.get((shot.id, len(rec.attempts) + 1)),
                    "label": shot.request.label, "prompt_fields": shot.request.prompt_fields,
                    "video": getattr(shot.request, "video", None),  # Animate: the plate's prepared folder
                    **task_fields(shot),  # Animate: mode, refert_num, LoRAs, mask, render hash (jobs/animate_shots.py)
                    "job": {**self.s.job_meta, "shot": shot.id, "output": shot.output,
                            "priority": shot.priority, "tags": shot.request.tags, "attempt": attempt,
                            "group": g.gid, "node_id": g.node_id, "gpus": g.size,
                            "earlier_attempts_gpu_seconds": round(rec.gpu_seconds, 3)}}
            for rank, ref in enumerate(g.render(task)):
                self.refs[ref] = (g.gid, "render", rank)
            rec.status = "running"
            rec.attempts.append({"attempt": attempt, "group": g.gid, "node_id": g.node_id, "gpus": g.size,
                                 "started_at": time.time(), "log": task["log"]})
            self._event(f"{shot.id}: attempt {attempt} on group {g.gid}")
            self._update_progress()  # watchers see the shot running even when it ends within one wait

    # -- results --------------------------------------------------------------------------------------------------
    def handle(self, ref) -> None:
        if ref not in self.refs:  # dropped with a group that failed in this same round
            return
        gid, kind, rank = self.refs.pop(ref)
        g = self.groups.get(gid)
        if g is None or g.state == "dead":
            return
        try:
            value = ray.get(ref)
        except Exception as e:  # any failure of a rank: lost actor/node, CUDA OOM, NCCL timeout, a bug
            self.group_failed(g, e)
            return
        if kind == "setup":
            g.ready_ranks += 1
            if rank == 0:
                g.node_id, g.load_s = value["node_id"], value["load_s"]
            if rank == 1 and not value.get("shares_work") and not self._warned_solo:
                self._warned_solo = True  # renderer.Pipeline has no `group=` yet: the group is formed, rank 0 computes
                self._event("note: the Pipeline takes no process group yet; rank 0 of each group renders alone")
            if g.ready_ranks == g.size:
                g.state = "idle"
                self.group_failures_in_a_row = 0
                self._event(f"group {gid}: ready on node {g.node_id[:12]} (models loaded in {g.load_s:.1f}s)")
            return
        g.pending_ranks -= 1
        if rank == 0:
            g.result = value
        if g.pending_ranks == 0:
            self.shot_done(g)

    def shot_done(self, g: GroupHandle) -> None:
        rec = self.records[g.shot_id]
        res = g.result or {}
        att = rec.attempts[-1]
        close_attempt(att, "done", seconds=res.get("seconds"), node_id=g.node_id,
                      **({"layout": res["layout"]} if res.get("layout") else {}))  # the layout the shot ran on
        rec.status, rec.result, rec.error = "done", res, None
        if rec.shot.estimate_s > 0 and res.get("seconds"):
            ratio = res["seconds"] / rec.shot.estimate_s
            self.speed = ratio if self._count("done") <= 1 else 0.7 * self.speed + 0.3 * ratio
        g.state, g.shot_id = "idle", None
        self._event(f"{rec.shot.id}: done in {res.get('seconds', 0):.1f}s -> {res.get('mp4')}")

    def group_failed(self, g: GroupHandle, error: BaseException, reason: str | None = None) -> None:
        """Kill and forget the group, count the failure against its node, retry or fail its shot."""
        summary = reason or short_error(error)
        kind = classify(error)
        deterministic = g.state == "busy" and kind == INPUT
        node = g.lookup_node()
        shot_id = g.shot_id if g.state == "busy" else None
        if deterministic:
            g.state, g.shot_id = "idle", None  # the group is healthy; the shot's settings are the problem
            self._drop_refs(g.gid)
        else:
            self._retire(g)
            if g.ready_ranks < g.size:
                self.group_failures_in_a_row += 1
            if node:
                self.node_failed[node].add(shot_id or f"start:{g.gid}")
                self._maybe_blocklist(node)
            self._event(f"group {g.gid}: {summary}" + (f" (node {node[:12]})" if node else ""))
        if kind == ENVIRONMENT and not self.stopped:
            self.stopped = f"{summary}: {FIXES[ENVIRONMENT]}"
        if shot_id is None:
            if kind == ENVIRONMENT:
                self.fail_remaining(f"not started: the job stopped: {self.stopped}", ENVIRONMENT)
            return
        rec = self.records[shot_id]
        att = rec.attempts[-1]
        close_attempt(att, "failed", seconds=round(time.time() - att["started_at"], 3), error=summary,
                      node_id=att.get("node_id") or node, **{"class": kind})
        _append_log(Path(att["log"]), f"attempt failed ({kind}): {summary}\n{error!r}"[:4000])
        _remove_partial(self.out_dir, rec.shot.output)
        rec.error = summary
        retry = (kind == PREEMPTION and rec.preemptions() <= self.s.max_preemptions) or \
            (kind not in (INPUT, ENVIRONMENT) and rec.budget_used() <= self.s.max_retries)
        if retry:
            rec.status = "queued"
            self.retries += 1
            self.queue.push(rec.shot)
            self._event(f"{shot_id}: attempt {att['attempt']} failed ({kind}: {summary}); back in the queue")
        else:
            rec.status, rec.failure_class = "failed", kind
            why = {INPUT: "not retried: the shot's settings", ENVIRONMENT: "not retried: the machine"}.get(
                kind, f"after {len(rec.attempts)} attempts")
            self._event(f"{shot_id}: FAILED ({kind}) {why}: {summary}")
        if kind == ENVIRONMENT:
            self.fail_remaining(f"not started: the job stopped: {self.stopped}", ENVIRONMENT)

    @property
    def node_failures(self) -> dict[str, int]:
        return {n: len(f) for n, f in self.node_failed.items()}

    def _maybe_blocklist(self, node: str) -> None:
        failures = len(self.node_failed[node])
        if failures < self.s.node_failure_limit or node in self.blocklist:
            return
        self.blocklist.add(node)
        if self.capacity() == 0 and any(n["NodeID"] == node and n.get("Alive") for n in ray.nodes()):
            # blocklisting the last usable node would fail every remaining shot at once; the per-shot retry
            # limit still bounds the damage, so keep it and say so
            self.blocklist.discard(node)
            self._event(f"node {node[:12]}: {failures} failures, but it is the last node that can hold a group: "
                        f"not blocklisted")
            return
        self._event(f"node {node[:12]}: blocklisted for this job after {failures} failures")

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for g in list(self.groups.values()):
            if g.state == "busy" and now - g.shot_started > self.s.shot_timeout_s:
                self.group_failed(g, TimeoutError(), f"shot {g.shot_id} timed out after "
                                                     f"{self.s.shot_timeout_s:g}s (job.shot_timeout_s)")
            elif g.state == "starting" and now - g.created > self.s.group_start_timeout_s:
                self.group_failed(g, TimeoutError(), f"not ready after {self.s.group_start_timeout_s:g}s "
                                                     f"(job.group_start_timeout_s)")

    def fail_remaining(self, why: str, kind: str | None = None) -> None:
        while self.queue:
            rec = self.records[self.queue.pop().id]
            rec.status, rec.error, rec.failure_class = "failed", why, kind or rec.failure_class
        self._event(f"giving up on the remaining shots: {why}")

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, ShotRecord]:
        try:
            while self.queue or any(g.state == "busy" for g in self.groups.values()):
                self.ensure_groups()
                if self.queue and not self._live_groups():
                    self.fail_remaining(f"no healthy node can hold a group of {self.s.gpus_per_group} "
                                        f"{'GPU' if self.s.use_gpus else 'CPU'}(s); blocklisted: "
                                        f"{', '.join(n[:12] for n in self.blocklist) or 'none'}", ENVIRONMENT)
                    break
                if self.group_failures_in_a_row > 3 + 2 * max(1, self.s.max_groups or 1):
                    self.fail_remaining(f"{self.group_failures_in_a_row} render groups in a row failed to start; "
                                        f"see the errors above", ENVIRONMENT)
                    break
                self.assign()
                if self.refs:
                    ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=0.5)
                    for ref in ready:
                        self.handle(ref)
                else:
                    time.sleep(0.2)
                self.check_timeouts()
                self._update_progress()
        finally:
            for g in list(self.groups.values()):
                self._retire(g)
            for rec in self.records.values():  # attempts cut short (Ctrl-C, driver error) still held their GPUs
                if rec.attempts and "gpu_seconds" not in rec.attempts[-1]:
                    close_attempt(rec.attempts[-1], "interrupted")
            self._update_progress()
            self._write_progress(0.0, force=True)
        return self.records


def _append_log(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} DRIVER {text}\n")
    except OSError:
        pass


def _remove_partial(out_dir: Path, output: str) -> None:
    """Temp files a killed rank may have left (video_io writes '.<name>.tmp-<pid>-<rand>' then renames)."""
    for p in list(out_dir.glob(f".{output}.mp4.tmp-*")) + list(out_dir.glob(f".{output}.json.tmp-*")):
        try:
            p.unlink()
        except OSError:
            pass
