"""Per-project GPU quotas and priorities for the submission service: which queued jobs start now.

Each project has a guaranteed share (GPUs it can always get, once running jobs finish) and a burst ceiling (GPUs
it may use while the cluster has them free). A job asks for `gpus` = GPUs per render group × groups; the
service then launches it with job.max_groups=groups, so the farm never takes more than was admitted.

    over the burst ceiling or the whole cluster   -> refused at submission, with the reason
    within the guarantee                          -> starts as soon as that many GPUs are free
    above the guarantee, within the burst         -> starts only on GPUs no waiting guaranteed job needs
    otherwise                                     -> queued, with the reason, until a job ends

Order among waiting jobs: within-guarantee first, then project priority, then the job's own priority, then
submission time. A guaranteed job that does not fit blocks later burst starts (no starvation by bursting);
running jobs are never preempted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class ProjectQuota:
    name: str
    guaranteed_gpus: int
    burst_gpus: int
    priority: int = 0

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> "ProjectQuota":
        g, b = int(d.get("guaranteed_gpus", 0)), d.get("burst_gpus")
        b = g if b is None else int(b)
        if g < 0 or b < g:
            raise ValueError(f"service.projects.{name}: need 0 <= guaranteed_gpus <= burst_gpus, got {g} and {b}")
        return cls(name, g, b, int(d.get("priority", 0)))


@dataclass(frozen=True)
class Demand:
    """A job as the quota logic sees it."""

    job_id: str
    project: str
    gpus: int
    priority: int = 0
    submitted_at: float = 0.0


def refusal(demand: Demand, quotas: dict[str, ProjectQuota], cluster_gpus: int) -> str | None:
    """Why a submission can never run under the current quotas (None: it may run, now or later)."""
    q = quotas.get(demand.project)
    if q is None:
        return (f"project {demand.project!r} has no quota on this service; configured projects: "
                f"{', '.join(sorted(quotas)) or 'none'} (service.projects)")
    if demand.gpus < 1:
        return f"a job needs at least one GPU, asked for {demand.gpus}"
    if demand.gpus > q.burst_gpus:
        return (f"asks for {demand.gpus} GPUs but project {q.name}'s burst limit is {q.burst_gpus} "
                f"(guaranteed {q.guaranteed_gpus}): ask for fewer groups or a larger quota")
    if demand.gpus > cluster_gpus:
        return f"asks for {demand.gpus} GPUs but the cluster has {cluster_gpus}: ask for fewer groups"
    return None


def admit(waiting: Iterable[Demand], running: Iterable[Demand], quotas: dict[str, ProjectQuota],
          cluster_gpus: int) -> tuple[list[str], dict[str, str]]:
    """(job ids to start now, in order; {job id: why it waits} for the rest)."""
    used: dict[str, int] = {}
    for r in running:
        used[r.project] = used.get(r.project, 0) + r.gpus
    free = cluster_gpus - sum(used.values())

    def guaranteed(d: Demand) -> bool:
        return used.get(d.project, 0) + d.gpus <= quotas[d.project].guaranteed_gpus

    order = sorted(waiting, key=lambda d: (not guaranteed(d), -quotas[d.project].priority, -d.priority,
                                           d.submitted_at, d.job_id))
    start, why = [], {}
    blocked_by: Demand | None = None  # a guaranteed job that did not fit: bursting must not take its GPUs
    for d in order:
        q = quotas[d.project]
        mine = used.get(d.project, 0)
        within = mine + d.gpus <= q.guaranteed_gpus
        if not within and mine + d.gpus > q.burst_gpus:
            why[d.job_id] = (f"project {q.name} uses {mine} GPU(s); {d.gpus} more would pass its burst limit "
                             f"of {q.burst_gpus}: waits for one of its jobs to end")
        elif d.gpus > free:
            why[d.job_id] = f"waits for {d.gpus} free GPU(s); {max(free, 0)} of {cluster_gpus} free now"
            if within and blocked_by is None:
                blocked_by = d
        elif not within and blocked_by is not None:
            why[d.job_id] = (f"above project {q.name}'s guarantee of {q.guaranteed_gpus}; the free GPUs are held "
                             f"for {blocked_by.job_id} (project {blocked_by.project}, within its guarantee)")
        else:
            start.append(d.job_id)
            used[d.project] = mine + d.gpus
            free -= d.gpus
    return start, why
