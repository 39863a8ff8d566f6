"""Project quotas of the submission service (jobs/service/quotas.py): guaranteed + burst GPUs and priorities."""
from __future__ import annotations

import pytest

from jobs.service.quotas import Demand, ProjectQuota, admit, refusal

Q = {"anim": ProjectQuota("anim", 2, 4, priority=0), "fx": ProjectQuota("fx", 2, 2, priority=5),
     "lab": ProjectQuota("lab", 0, 8, priority=-1)}


def d(job, project, gpus, priority=0, t=0.0):
    return Demand(job, project, gpus, priority, t)


def test_refusals_name_the_reason():
    assert "no quota" in refusal(d("j", "nope", 1), Q, 8) and "anim, fx, lab" in refusal(d("j", "nope", 1), Q, 8)
    assert "burst limit is 2" in refusal(d("j", "fx", 3), Q, 8)
    assert "the cluster has 6" in refusal(d("j", "lab", 7), Q, 6)
    assert refusal(d("j", "anim", 4), Q, 8) is None


def test_guaranteed_share_starts_and_burst_waits_for_free_gpus():
    # anim bursts to 4 of 6 GPUs; fx's guaranteed 2 still fit; lab (burst only) waits
    start, why = admit([d("f1", "fx", 2, t=2), d("l1", "lab", 1, t=3)], [d("a1", "anim", 4)], Q, 6)
    assert start == ["f1"] and "waits for 1 free GPU(s); 0 of 6 free now" in why["l1"]


def test_burst_may_not_take_gpus_a_guaranteed_job_waits_for():
    # fx asks 2 GPUs within its guarantee but only 1 is free: lab may not burst onto that 1
    start, why = admit([d("f1", "fx", 2, t=1), d("l1", "lab", 1, t=2)], [d("a1", "anim", 4), d("a2", "lab", 1)],
                       Q, 6)
    assert start == [] and "held for f1" in why["l1"] and "waits for 2 free GPU(s); 1 of 6" in why["f1"]


def test_over_burst_waits_for_own_jobs_and_priority_orders_the_rest():
    start, why = admit([d("a3", "anim", 2, t=1), d("l1", "lab", 2, t=2), d("l2", "lab", 2, priority=9, t=3)],
                       [d("a1", "anim", 4)], Q, 8)
    assert "would pass its burst limit of 4" in why["a3"]
    assert start == ["l2", "l1"]  # same project: the job's own priority first
    start, _ = admit([d("l1", "lab", 2, t=1), d("f1", "fx", 2, t=2)], [], Q, 3)
    assert start == ["f1"]  # within-guarantee and higher project priority before a burst job


@pytest.mark.parametrize("g, b", [(-1, 2), (3, 2)])
def test_bad_quota_config(g, b):
    with pytest.raises(ValueError, match="guaranteed_gpus <= burst_gpus"):
        ProjectQuota.from_dict("x", {"guaranteed_gpus": g, "burst_gpus": b})


def test_one_service_per_state_folder(tmp_path):
    from jobs.service.store import JobStore

    first = JobStore(tmp_path)
    with pytest.raises(RuntimeError, match="in use by another wanrender service \\(pid"):
        JobStore(tmp_path)
    first.close()
    JobStore(tmp_path).close()  # free again once the first one is gone


@pytest.mark.parametrize("env, args, message", [
    ({}, [], "no service token: set WANRENDER_SERVICE_TOKEN"),
    ({"WANRENDER_SERVICE_TOKEN": "short"}, [], "use at least 16"),
    ({"WANRENDER_SERVICE_TOKEN": "x" * 20}, ["service.projects_file=/nonexistent/q.yaml"],
     "service.projects_file: cannot read /nonexistent/q.yaml"),
    ({"WANRENDER_SERVICE_TOKEN": "x" * 20}, ["service.ray_address=http://127.0.0.1:1"],
     "service.cluster_gpus is needed with service.ray_address"),
])
def test_serve_refuses_bad_settings_before_starting_anything(tmp_path, monkeypatch, capsys, env, args, message):
    import ray

    from renderer.cli import main

    monkeypatch.delenv("WANRENDER_SERVICE_TOKEN", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", f"out={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "service").exists() and not ray.is_initialized()  # no state folder, no cluster
