"""`wanrender serve` over real HTTP on 127.0.0.1, against a Ray cluster this test starts (2 fake GPUs, dashboard /
job server on a free port). The service runs as its own process (`python -m renderer.cli serve`), so the test
also covers the CLI, the token from the environment, and a restart on the same state folder.

Jobs are the tiny model (64*48, 5 frames, 2 steps) on CPU. Every wait is a bounded loop.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

TOKEN = "test-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "stopped", "cancelled")
PROJECTS = {"anim": {"guaranteed_gpus": 1, "burst_gpus": 2}, "fx": {"guaranteed_gpus": 1, "burst_gpus": 2, "priority": 5}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(n: int = 2, steps: int = 2, name: str = "svc", frames: int = 5) -> str:
    return yaml.safe_dump({"name": name, "model": "tiny_t2v",
                           "defaults": {"size": "64*48", "frames": frames, "steps": steps},
                           "shots": [{"id": f"s{i}", "prompt": f"a lantern on a pier, take {i}", "seed": i}
                                     for i in range(n)]})


class Api:
    def __init__(self, url: str):
        self.url = url

    def __call__(self, method: str, path: str, body: dict | None = None, token: str | None = TOKEN,
                 key: str | None = None) -> tuple[int, dict | str]:
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if key is not None:
            req.add_header("Idempotency-Key", key)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, raw = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read().decode()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def wait(self, job_id: str, until, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, job = self("GET", f"/v1/jobs/{job_id}")
            assert code == 200, job
            if until(job):
                return job
            time.sleep(1.0)
        raise AssertionError(f"job {job_id} did not get there in {timeout}s: {job}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Our own Ray head (`ray start --head --block`, ended by its pid) with every port chosen free: the node's job
    agent otherwise takes the fixed port 52365, which another Ray on a shared machine may hold."""
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "metrics-export-port",
                                            "runtime-env-agent-port", "node-manager-port", "object-manager-port",
                                            "ray-client-server-port")}
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "w")
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--num-cpus=4", "--num-gpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                             *(f"--{flag}={port}" for flag, port in ports.items())],
                            # a loopback-only test cluster: no Ray token (the service's own bearer token is tested)
                            env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"},
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        # the job agent comes up after the dashboard (slowly on a busy machine): wait until it takes a job
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                JobSubmissionClient(url).submit_job(entrypoint="true", submission_id=f"warmup-{time.time_ns()}")
                break
            except (RuntimeError, ConnectionError) as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"Ray's job agent did not start in 180s: {e}")
                time.sleep(2.0)
        yield url
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head ends the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def start_service(cluster: str, base: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "WANRENDER_SERVICE_TOKEN": TOKEN, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(base / f"service-{time.time_ns()}.log", "w")
    (base / "quotas.yaml").write_text(yaml.safe_dump(PROJECTS))
    proc = subprocess.Popen([sys.executable, "-m", "renderer.cli", "serve", f"out={base}", f"service.port={port}",
                             f"service.ray_address={cluster}", "service.cluster_gpus=2", "service.poll_s=0.5",
                             "service.render_overrides=['render.device=cpu']",
                             f"service.projects_file={base / 'quotas.yaml'}"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = Api(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(log.name).read_text()
        try:
            if api("GET", "/v1/health", token=None)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"service did not answer in 120s: {Path(log.name).read_text()}")


def stop_service(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("service")
    port = free_port()
    proc = start_service(cluster, base, port)
    state = {"proc": proc, "base": base, "port": port, "cluster": cluster}
    yield Api(f"http://127.0.0.1:{port}"), state
    stop_service(state["proc"])


def test_no_anonymous_or_wrong_token(service):
    api, _ = service
    body = {"project": "anim", "manifest": manifest()}
    assert api("POST", "/v1/jobs", body, token=None, key="k0")[0] == 401
    assert api("POST", "/v1/jobs", body, token=TOKEN[:-1] + "x", key="k0")[0] == 401
    assert api("POST", "/v1/jobs", body, token="short", key="k0")[0] == 401
    assert api("GET", "/v1/jobs", token=None)[0] == 401
    assert api("GET", "/v1/jobs")[1] == {"jobs": []}  # nothing was accepted


def test_bad_manifest_is_refused_with_every_problem(service):
    api, _ = service
    bad = yaml.safe_dump({"model": "tiny_t2v", "shots": [{"id": "s0", "prompt": "x", "steps": 0},
                                                         {"id": "s1", "prompt": "y", "size": "10*10"}]})
    code, err = api("POST", "/v1/jobs", {"project": "anim", "manifest": bad}, key="bad1")
    assert code == 422 and "2 problem(s)" in err["error"], err
    assert any(p.startswith("shot s0: steps:") for p in err["problems"]), err
    assert any(p.startswith("shot s1: size:") for p in err["problems"]), err
    code, err = api("POST", "/v1/jobs", {"project": "anim", "manifest": manifest(), "overrides": ["out=/tmp/x"]},
                    key="bad2")
    assert code == 422 and "set by the service" in err["problems"][0]
    assert api("POST", "/v1/jobs", {"project": "anim", "manifest": manifest()})[0] == 400  # no idempotency key
    assert api("GET", "/v1/jobs")[1] == {"jobs": []}


def test_submit_quota_queue_cancel_and_report(service):
    api, _ = service
    body = {"project": "anim", "manifest": manifest(name="first")}
    code, a = api("POST", "/v1/jobs", body, key="job-a")
    assert code == 201 and a["gpus"] == 1 and a["shots"] == 2, a
    code, again = api("POST", "/v1/jobs", body, key="job-a")
    assert code == 200 and again["id"] == a["id"]  # same key, same job
    code, err = api("POST", "/v1/jobs", {**body, "priority": 3}, key="job-a")
    assert code == 409 and a["id"] in err["error"]
    # fx's 2 GPUs are above its guarantee of 1 and only 1 GPU is free: queued with the reason
    code, b = api("POST", "/v1/jobs", {"project": "fx", "manifest": manifest(name="second"), "groups": 2}, key="b")
    assert code == 201 and b["state"] == "queued" and "waits for 2 free GPU(s); 1 of 2 free" in b["reason"], b
    code, err = api("POST", "/v1/jobs", {"project": "fx", "manifest": manifest(), "groups": 3}, key="c")
    assert code == 403 and "burst limit is 2" in err["error"]
    code, err = api("POST", "/v1/jobs", {"project": "nope", "manifest": manifest()}, key="d")
    assert code == 403 and "no quota" in err["error"]
    code, b = api("POST", f"/v1/jobs/{b['id']}/cancel")
    assert code == 200 and b["state"] == "cancelled"
    assert api("POST", f"/v1/jobs/{b['id']}/cancel")[0] == 409

    job = api.wait(a["id"], lambda j: j["state"] in TERMINAL)
    assert job["state"] == "succeeded", job
    assert [s["status"] for s in job["shots_status"]] == ["done", "done"] and job["progress"] == 1.0
    assert all(s["gpu_seconds"] > 0 and s["eta_s"] == 0.0 for s in job["shots_status"])
    code, rep = api("GET", f"/v1/jobs/{a['id']}/report")
    assert code == 200 and rep["counts"] == {"done": 2} and rep["accounting"]["gpu_seconds"] > 0
    assert rep["job"]["name"] == "first"
    out = Path(a["out_dir"])
    assert (out / "s0.mp4").is_file() and yaml.safe_load((out / "config.yaml").read_text())["job"]["max_groups"] == 1
    code, html = api("GET", f"/v1/jobs/{a['id']}/report.html")
    assert code == 200 and "wanrender report: first" in html
    code, csv_text = api("GET", f"/v1/jobs/{a['id']}/accounting.csv")
    assert code == 200 and csv_text.splitlines()[-1].startswith("TOTAL,")
    code, logs = api("GET", f"/v1/jobs/{a['id']}/logs")
    assert code == 200 and "job first: 0 rendered" not in logs and "job first: 2 rendered" in logs, logs[-2000:]
    assert "has not started (cancelled" in api("GET", f"/v1/jobs/{b['id']}/logs")[1]
    assert api("GET", "/v1/jobs/nope/report")[0] == 404


def test_cancel_a_running_job(service):
    api, _ = service
    code, c = api("POST", "/v1/jobs", {"project": "anim", "manifest": manifest(n=12, steps=100, name="long", frames=33)},
                  key="long")
    assert code == 201, c
    # running, with per-shot progress from the farm's progress.json (a shot has started)
    job = api.wait(c["id"], lambda j: j["state"] != "pending" and any(
        s["status"] == "running" for s in j["shots_status"] or []) or j["state"] in TERMINAL, timeout=240)
    assert job["state"] == "running", job
    running = [s for s in job["shots_status"] if s["status"] == "running"]
    assert running[0]["eta_s"] is not None and job["eta_s"] is not None
    code, c = api("POST", f"/v1/jobs/{c['id']}/cancel")
    assert code == 200 and c["reason"] == "cancel requested"
    job = api.wait(c["id"], lambda j: j["state"] in TERMINAL, timeout=120)
    assert job["state"] == "stopped" and job["reason"] == "cancelled by request", job
    # the driver got Ctrl-C: it wrote its report, saying which shots were cut short
    rep = json.loads((Path(c["out_dir"]) / "report.json").read_text())
    assert "interrupted" in rep["counts"], rep["counts"]


def test_restarted_service_knows_its_jobs(service):
    api, state = service
    before = {j["id"]: j["state"] for j in api("GET", "/v1/jobs")[1]["jobs"]}
    assert sorted(before.values()) == ["cancelled", "stopped", "succeeded"]
    stop_service(state["proc"])
    state["proc"] = start_service(state["cluster"], state["base"], state["port"])
    after = {j["id"]: j["state"] for j in api("GET", "/v1/jobs")[1]["jobs"]}
    assert after == before
    first = next(i for i, s in before.items() if s == "succeeded")
    code, again = api("POST", "/v1/jobs", {"project": "anim", "manifest": manifest(name="first")}, key="job-a")
    assert code == 200 and again["id"] == first
    assert api("GET", f"/v1/jobs/{first}/report")[0] == 200
