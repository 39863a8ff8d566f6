"""Scheduler load: a large manifest through the real farm driver with a render that costs nothing.

    python -m benchmarks.farm_load --shots 1000 --gpus 8 --record

The manifest, validation, plan, priority queue, scheduler loop (jobs/scheduler.py: groups, dispatch, retries,
progress.json) and report (jobs/report.py) are the real ones, on an embedded Ray cluster with fake GPU resources
(ray.init(num_gpus=N) on a CPU machine). Only the render group's ranks are stubs: each "render" writes a tiny
placeholder MP4 + sidecar atomically and returns at once, so every second measured is the driver's.

Measured: scheduler overhead per shot (steady-state wall time per shot once groups are up, and the driver
process's CPU time per shot), validation + plan time, report time, and the driver's RSS over the run (sampled
with the number of shots done, to see that memory is flat). Target: <= 20 ms per shot, flat memory.
The raw JSON (commit + dirty flag from renderer/provenance.py, also without .git) goes to benchmarks/results/;
--record also adds a row to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray

from jobs.group import GroupHandle
from renderer.provenance import code_version, provenance

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 20.0


class StubRank:
    """A render-group rank that renders nothing: the shot's outputs are a few bytes, written atomically."""

    def __init__(self, spec: dict):
        self.rank = int(spec["rank"])

    def where(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def master_address(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def setup(self, master) -> dict:
        return {**self.where(), "rank": self.rank, "load_s": 0.0, "shares_work": True}

    def render(self, task: dict) -> dict:
        t0 = time.perf_counter()
        out: dict = {"rank": self.rank}
        if self.rank == 0:
            from renderer.video_io import write_json_atomic

            mp4 = Path(task["out_dir"]) / f"{task['output']}.mp4"
            tmp = mp4.with_name(f".{mp4.name}.tmp-{os.getpid()}")
            tmp.write_bytes(b"stub render: not a video\n")
            os.replace(tmp, mp4)
            side = write_json_atomic(mp4.with_suffix(".json"), {"shot_id": task["shot"].shot_id,
                                                                "job": task["job"], "stub": True})
            out.update(mp4=str(mp4), sidecar=str(side))
        out.update(seconds=round(time.perf_counter() - t0, 4), timings={})
        return out


class StubGroup(GroupHandle):
    actor_class = ray.remote(max_restarts=0, max_task_retries=0)(StubRank)


def git_stamp() -> dict:
    """The commit and dirty flag the code ran at, through renderer/provenance.py: git where .git is, the
    SOURCE_STAMP.json written before the tree was sent where it is not; plus the source digest and which source
    answered."""
    p = provenance()
    return {"commit": p["commit"], "dirty": p["dirty"], "digest": p["digest"], "source": p["source"],
            "code_version": code_version()}


def write_manifest(path: Path, shots: int) -> Path:
    import yaml

    entries = [{"id": f"sh{i:05d}", "prompt": f"load test shot {i}: a lighthouse at dusk", "seed": i,
                "priority": i % 5} for i in range(shots)]
    path.write_text(yaml.safe_dump({"name": f"farm-load-{shots}", "model": "tiny_t2v",
                                    "defaults": {"size": "64*48", "frames": 5, "steps": 2}, "shots": entries}))
    return path


class RssSampler(threading.Thread):
    """The driver's resident memory every `every_s`, with how many shots were done then."""

    def __init__(self, farm_ref: list, every_s: float = 0.25):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.farm_ref, self.every_s = farm_ref, every_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        farm = self.farm_ref[0] if self.farm_ref else None
        done = sum(1 for r in list(farm.records.values()) if r.status == "done") if farm else 0
        self.samples.append({"t_s": round(time.perf_counter() - self.t0, 3), "done": done,
                             "rss_mb": round(self.proc.memory_info().rss / 2**20, 2)})

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every_s)
        self.sample()  # the end of the run


def memory_summary(samples: list[dict], shots: int) -> dict:
    """RSS when a quarter of the shots were done vs at the end: flat means no growth per shot."""
    if not samples:
        return {}
    quarter = next((s for s in samples if s["done"] >= shots // 4), samples[0])
    end = samples[-1]
    growth = end["rss_mb"] - quarter["rss_mb"]
    per_1000 = growth / max(1, end["done"] - quarter["done"]) * 1000
    return {"rss_start_mb": samples[0]["rss_mb"], "rss_at_quarter_mb": quarter["rss_mb"],
            "rss_end_mb": end["rss_mb"], "rss_peak_mb": max(s["rss_mb"] for s in samples),
            "growth_after_quarter_mb": round(growth, 2), "growth_mb_per_1000_shots": round(per_1000, 2)}


def run(shots: int, gpus: int, gpus_per_group: int, cpus: int | None, workdir: Path) -> dict:
    from jobs.farm import prepare
    from jobs.progress import JobProgress
    from jobs.report import write_report
    from jobs.scheduler import Farm, FarmSettings
    from renderer.conf import compose

    manifest = write_manifest(workdir / "manifest.yaml", shots)
    out = workdir / "out"
    t = time.perf_counter()
    cfg = compose([f"manifest={manifest}", f"out={out}", "render.device=cpu", "job.live_progress=false"])
    plan, _ = prepare(cfg)  # the real validation + plan (render hashes, done checks, priority order, estimates)
    plan_s = time.perf_counter() - t
    assert plan.gpus_per_group == 1 and len(plan.todo) == shots
    plan.gpus_per_group = gpus_per_group
    groups = gpus // gpus_per_group
    ray.init(address="local", num_cpus=cpus or gpus + 2, num_gpus=gpus, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    try:
        settings = FarmSettings(gpus_per_group=gpus_per_group, use_gpus=True, max_retries=2,
                                shot_timeout_s=600, group_start_timeout_s=600,
                                job_meta={"name": plan.manifest.name, "manifest": str(manifest)})
        farm_ref: list = []
        sampler = RssSampler(farm_ref)
        sampler.start()
        events = workdir / "driver-events.log"
        with open(events, "w") as log, contextlib.redirect_stdout(log):  # 3 event lines a shot: keep them
            farm = Farm(plan, settings, JobProgress(shots, 0, live=False, every_s=5.0), group_factory=StubGroup)
            farm_ref.append(farm)
            cpu0, t0 = time.process_time(), time.perf_counter()
            records = farm.run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        sampler.stop.set()
        sampler.join()
        t = time.perf_counter()
        write_report(out, {"name": plan.manifest.name, "model": plan.model, "gpus_per_group": gpus_per_group},
                     records, wall)
        report_s = time.perf_counter() - t
    finally:
        ray.shutdown()
    done = [r for r in records.values() if r.status == "done"]
    ends = sorted(r.attempts[-1]["ended_at"] for r in done)
    steady = (ends[-1] - ends[0]) / max(1, len(ends) - 1) if len(ends) > 1 else None
    render_s = sum(float((r.result or {}).get("seconds") or 0.0) for r in done)
    mem = memory_summary(sampler.samples, shots)
    per_shot_ms = 1000 * steady if steady is not None else None
    return {
        "shots": shots, "done": len(done), "failed": sum(1 for r in records.values() if r.status == "failed"),
        "gpus": gpus, "gpus_per_group": gpus_per_group, "groups": groups, "retries": farm.retries,
        "plan_s": round(plan_s, 3), "run_wall_s": round(wall, 3), "report_s": round(report_s, 3),
        "steady_wall_ms_per_shot": None if per_shot_ms is None else round(per_shot_ms, 3),
        "driver_cpu_ms_per_shot": round(1000 * cpu / shots, 3),
        "run_wall_ms_per_shot": round(1000 * wall / shots, 3),
        "stub_render_s_total": round(render_s, 3),
        "memory": mem, "memory_samples": sampler.samples,
        "target_ms_per_shot": TARGET_MS,
        "meets_target": per_shot_ms is not None and per_shot_ms <= TARGET_MS and len(done) == shots,
    }


def results_row(res: dict, command: str, stamp: dict, machine: str) -> str:
    mem = res["memory"]
    commit = (stamp["commit"] or "?")[:10] + ("-dirty" if stamp["dirty"] else "")
    return (f"| {time.strftime('%Y-%m-%d')} | farm load: {res['shots']} shots, {res['groups']} stub groups "
            f"({res['gpus']} fake GPUs) | {machine} | `{command}` | {commit} | "
            f"{res['steady_wall_ms_per_shot']} ms/shot steady wall, {res['driver_cpu_ms_per_shot']} ms/shot driver "
            f"CPU (target <= {TARGET_MS:g}); plan {res['plan_s']} s, report {res['report_s']} s; RSS "
            f"{mem.get('rss_at_quarter_mb')} -> {mem.get('rss_end_mb')} MB after 1/4 of the shots "
            f"({mem.get('growth_mb_per_1000_shots')} MB per 1000 shots) |")


SECTION = "### Farm scheduler load (stub render, fake GPUs)"
TABLE_HEAD = ("| date | run | machine | command | commit | result |\n"
              "|---|---|---|---|---|---|")


def record_row(results_md: Path, row: str) -> None:
    """Add the row under this benchmark's table in RESULTS.md (the section is created the first time)."""
    lines = results_md.read_text(encoding="utf-8").splitlines() if results_md.is_file() else []
    if SECTION not in lines:
        lines += ["", SECTION, "", "`python -m benchmarks.farm_load` (raw JSON in benchmarks/results/farm_load-*.json): "
                  "the real manifest, plan, scheduler and report code; each render is a stub that writes a few "
                  "bytes. Steady wall ms/shot is the scheduling cost with zero-cost renders.", "", TABLE_HEAD]
        at = len(lines)
    else:
        at = lines.index(SECTION) + 1
        while at < len(lines) and not lines[at].startswith("|"):
            at += 1
        while at < len(lines) and lines[at].startswith("|"):
            at += 1
    lines.insert(at, row)
    results_md.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.farm_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=8, help="fake GPU resources of the embedded cluster")
    ap.add_argument("--gpus-per-group", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=None, help="Ray CPU resources (default: gpus + 2)")
    ap.add_argument("--out", type=Path, default=None, help="raw JSON path (default: benchmarks/results/"
                                                            "farm_load-<shots>-<UTC time>.json)")
    ap.add_argument("--record", action="store_true", help="also add a row to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.shots < 1 or args.gpus < args.gpus_per_group or args.gpus_per_group < 1:
        print("error: need --shots >= 1 and --gpus >= --gpus-per-group >= 1", file=sys.stderr)
        return 2
    command = "python -m benchmarks.farm_load " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = git_stamp()
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, {platform.machine()}, no GPU"
    print(f"farm load: {args.shots} shots on {args.gpus // args.gpus_per_group} stub groups "
          f"({args.gpus} fake GPUs), commit {stamp['commit']}{' (dirty)' if stamp['dirty'] else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="farm_load-") as tmp:
        res = run(args.shots, args.gpus, args.gpus_per_group, args.cpus, Path(tmp))
    record = {"benchmark": "farm_load", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine, "python": platform.python_version(), "ray": ray.__version__,
              "command": command, "git": stamp, **res}
    path = args.out or REPO / "benchmarks" / "results" / (f"farm_load-{args.shots}-"
                                                          f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    mem = res["memory"]
    print(f"done {res['done']}/{res['shots']} · steady {res['steady_wall_ms_per_shot']} ms/shot wall · driver CPU "
          f"{res['driver_cpu_ms_per_shot']} ms/shot · plan {res['plan_s']} s · report {res['report_s']} s · RSS "
          f"{mem.get('rss_at_quarter_mb')} -> {mem.get('rss_end_mb')} MB "
          f"({mem.get('growth_mb_per_1000_shots')} MB/1000 shots) · target <= {TARGET_MS:g} ms: "
          f"{'met' if res['meets_target'] else 'NOT met'}\nraw: {path}")
    if args.record:
        record_row(REPO / "benchmarks" / "RESULTS.md", results_row(res, command, stamp, machine))
    return 0 if res["done"] == res["shots"] else 1


if __name__ == "__main__":
    sys.exit(main())
