"""The farm on a two-node Ray cluster (ray.cluster_utils.Cluster, one fake GPU per node): a node removed while it
renders a shot, and a node blocklisted after repeated failures."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from jobs.farm import FAULTS_ENV, run_job
from renderer.conf import compose
from renderer.video_io import video_info


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    # the head holds no GPU (no render group there); fast health checks so a removed node is noticed in ~1 s
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 300, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0, "health_check_timeout_ms": 300}})
    workers = [c.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="WARNING")
    yield c, workers
    ray.shutdown()
    c.shutdown()


def write_manifest(path: Path, n: int) -> Path:
    shots = [{"id": f"n{i}", "prompt": f"two-node shot {i}", "seed": i} for i in range(n)]
    path.write_text(yaml.safe_dump({"model": "tiny_t2v", "defaults": {"size": "64*48", "frames": 5, "steps": 3},
                                    "shots": shots}))
    return path


def job(manifest: Path, out: Path, *extra: str) -> int:
    return run_job(compose([f"manifest={manifest}", f"out={out}", "render.device=cpu", "cluster=ray",
                            "cluster.address=auto", "job.live_progress=false", *extra]))


def test_node_removed_mid_job_the_job_still_completes(cluster, tmp_path, monkeypatch):
    c, workers = cluster
    manifest = write_manifest(tmp_path / "shots.yaml", 6)
    out = tmp_path / "out"
    # n0 (first in the queue) hangs on its first attempt; the node it hangs on is removed from the cluster
    monkeypatch.setenv(FAULTS_ENV, "hang:n0:1")
    removed: list[str] = []

    def remove_node_running_n0():
        log = out / "logs" / "n0.attempt1.log"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = log.read_text() if log.is_file() else ""
            m = re.search(r"node ([0-9a-f]{12})", text)
            if m and "fault injection: hang" in text:
                node = next(w for w in workers if w.node_id.startswith(m.group(1)))
                removed.append(node.node_id)
                c.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.1)

    remover = threading.Thread(target=remove_node_running_n0, daemon=True)
    remover.start()
    rc = job(manifest, out, "job.shot_timeout_s=120")
    remover.join(timeout=5)
    assert removed, "the hung shot never started"
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"] == {"done": 6}
    n0 = next(s for s in rep["shots"] if s["id"] == "n0")
    assert [a["status"] for a in n0["attempts"]] == ["failed", "done"]
    assert n0["attempts"][0]["node_id"] == removed[0] and n0["attempts"][1]["node_id"] != removed[0]
    assert rep["job"]["node_failures"].get(removed[0], 0) >= 1
    for s in rep["shots"]:
        assert video_info(out / f"{s['id']}.mp4")["frames"] == 5


def test_failing_node_is_blocklisted(cluster, tmp_path, monkeypatch):
    """node_failure_limit=1: after one failure no new group goes to that node; the job finishes on the other."""
    c, _ = cluster
    c.add_node(num_cpus=2, num_gpus=1)  # back to two GPU nodes after the previous test removed one
    c.wait_for_nodes()
    manifest = write_manifest(tmp_path / "shots.yaml", 4)
    out = tmp_path / "out"
    monkeypatch.setenv(FAULTS_ENV, "error:n1:1")
    assert job(manifest, out, "job.node_failure_limit=1") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"] == {"done": 4}
    bad = rep["job"]["blocklisted_nodes"]
    assert len(bad) == 1
    n1 = next(s for s in rep["shots"] if s["id"] == "n1")
    failed_at = n1["attempts"][0]["ended_at"]
    assert n1["attempts"][0]["node_id"] == bad[0]
    later = [a for s in rep["shots"] for a in s["attempts"] if a["started_at"] > failed_at]
    assert later and all(a["node_id"] != bad[0] for a in later)


def test_blocklist_keeps_new_groups_off_a_node(cluster):
    """The placement-group label selector GroupHandle uses: bundles never land on an avoided node."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    assert len(alive) == 2
    for avoid in alive:
        pg = placement_group([{"GPU": 1, "CPU": 1}], strategy="STRICT_PACK",
                             bundle_label_selector=[{"ray.io/node-id": f"!in({avoid})"}])
        ray.get(pg.ready(), timeout=30)
        placed = set(placement_group_table(pg)["bundles_to_node_id"].values())
        remove_placement_group(pg)
        assert placed == set(alive) - {avoid}
