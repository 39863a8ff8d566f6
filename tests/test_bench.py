"""benchmarks.scaling / worker / report: the tiny model on CPU ranks (gloo), the config without Hydra, the reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.anchors import ANCHORS, anchors_for
from benchmarks.report import markdown, write_reports
from benchmarks.scaling import check_report, load_config, plan_rows, run_scaling, worker_spec
from benchmarks.worker import SubsetSchedule, expected_experts, model_flops, subset_indices
from renderer.presets import load_preset

ROOT = Path(__file__).resolve().parents[1]


def _head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The CI smoke at a smaller scale: 1 and 2 CPU ranks, 2 timed steps of the tiny model's 6."""
    out = tmp_path_factory.mktemp("bench")
    cfg = load_config("smoke", [f"out={out / 'reports'}", f"scratch={out / 'scratch'}", "cpu_threads=1"])
    rc, report = run_scaling(cfg, ["bench=smoke"])
    return rc, report, out / "reports"


def test_smoke_report_is_complete(smoke):
    rc, report, out = smoke
    assert rc == 0
    assert [(r["gpus"], r["layout"]) for r in report["rows"]] == [(1, "single"), (2, "gpus2")]
    for r in report["rows"]:
        assert r["scaled"] == "scaled from 2 of 6 steps" and r["timed_step_indices"] == [0, 5]
        assert r["experts_used"] == [0, 1]  # one step of each expert, as the full schedule would run them
        assert r["step"]["n"] == 2 and r["step"]["min_s"] <= r["step"]["median_s"] <= r["step"]["max_s"]
        sec = r["seconds"]
        assert sec["denoise"] == pytest.approx(r["step"]["median_s"] * 6)
        assert sec["total"] == pytest.approx(sec["text_encode"] + sec["image_encode"] + sec["denoise"]
                                             + sec["vae_decode"] + sec["mp4_write"])
        assert len(r["ranks"]) == r["gpus"] and all(m["peak_rss_gb"] > 0 for m in r["ranks"])
        assert r["device_name"].startswith("CPU") and r["tflops_per_gpu"] > 0
        assert Path(r["mp4_path"]).stat().st_size > 0
        # which sampler stepped the timed steps, as recorded from the sampler the render built
        assert r["sampler"] == "unipc" and r["sampler_ran"].startswith("euler over 2 of the 6 timesteps")
        assert r["provenance"]["commit"] == _head() and r["code_version"].startswith(f"0.1.0+g{_head()[:12]}")
    two = report["rows"][1]
    assert two["parallel"].startswith("cfg2×ulysses1") and two["efficiency"] == pytest.approx(two["speedup"] / 2)
    on_disk = json.loads((out / "scaling.json").read_text())
    assert len(on_disk["rows"]) == 2 and on_disk["scaled"] == "scaled from 2 of 6 steps"
    assert on_disk["provenance"]["commit"] == _head() and on_disk["code_version"] == report["code_version"]
    md = (out / "scaling.md").read_text()
    assert md.count("measured (this run)") == 2 and "† scaled from 2 of 6 steps" in md
    assert md.count("sampler euler over 2 of the 6 timesteps") == 2 and f"+g{_head()[:12]}" in md
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert check_report(on_disk, 2, [out / "scaling.json"]) == []
    assert sorted(p.name for p in out.iterdir()) == ["scaling.json", "scaling.md", "scaling.png"]  # rest: scratch


def test_incomplete_report_is_caught(smoke):
    _, report, out = smoke
    broken = json.loads(json.dumps(report))
    broken["rows"][1]["seconds"]["vae_decode"] = None
    del broken["rows"][1]["speedup"]
    problems = check_report(broken, 3, [out / "missing.png"])
    assert any("2 of 3 planned rows" in p for p in problems)
    assert any("no vae_decode time" in p for p in problems)
    assert any("no speedup" in p for p in problems)
    assert any("missing.png was not written" in p for p in problems)


def test_row_timeout_and_budget(tmp_path, capsys):
    cfg = load_config("smoke", [f"out={tmp_path}", "gpus=[2,1]", "row_timeout_s=1", "budget_s=31"])
    rc, report = run_scaling(cfg)
    assert rc == 1 and report["rows"] == []
    assert report["failed"][0]["error"] == "timed out after 1 s"
    # the budget leaves < 30 s after the first row: the second is not started, and the report says it is missing
    assert report["skipped"] == [{"gpus": 1, "layout": "single", "why": "budget_s=31 used up before this row"}]
    assert "0 of 2 planned rows measured" in capsys.readouterr().err
    assert "timed out" in (tmp_path / "scaling.md").read_text()
    assert report["failed"][0]["log"] == str(tmp_path / "failed_g2_gpus2.log")
    assert "benchmarks.worker" in (tmp_path / "failed_g2_gpus2.log").read_text()


def test_subset_schedule_times_both_a14b_experts():
    preset = load_preset("t2v_a14b")
    assert subset_indices(40, 2) == [0, 39] and subset_indices(40, 3) == [0, 1, 39]
    assert subset_indices(6, 9) == list(range(6))
    assert expected_experts(preset, 40, preset.shift, subset_indices(40, 2), preset.guidance) == [0, 1]
    # a plain 2-step schedule would never reach the low-noise expert: why K steps come out of the real schedule
    assert expected_experts(preset, 2, preset.shift, [0, 1], preset.guidance) == [0, 0]
    sched = SubsetSchedule(40, preset.shift, [0, 1, 39])
    assert sched.steps == 3 and sched.timesteps.tolist()[0] == 999.0 and sched.timesteps.tolist()[2] < 875
    assert sched._sig[-1] == 0.0


def test_flops_match_the_published_floor():
    fl = model_flops(load_preset("t2v_a14b"), "1280*720", 81)
    assert fl["tokens"] == 75_600
    assert fl["per_forward"]["self_attention"] / 1e15 == pytest.approx(4.68, rel=0.01)  # anchors.md
    assert fl["per_forward"]["linear"] / 1e15 == pytest.approx(1.81, rel=0.02)
    assert model_flops(load_preset("ti2v_5b"), "1280*704", 121)["tokens"] == 27_280


def test_presets_reproduce_the_comparison():
    a14b, ti2v = load_config("a14b_720p"), load_config("ti2v_5b_720p")
    assert (a14b["model"]["name"], a14b["shot"]["size"], a14b["shot"]["frames"], a14b["shot"]["steps"]) == (
        "t2v_a14b", "1280*720", 81, 40)
    assert (ti2v["model"]["name"], ti2v["shot"]["size"], ti2v["shot"]["frames"], ti2v["shot"]["steps"]) == (
        "ti2v_5b", "1280*704", 121, 50)
    assert a14b["render"]["random_weights"] is True and a14b["gpus"] == [1, 8]
    with pytest.raises(ValueError, match="gpu"):
        load_config("smoke", ["gpu=[1]"])


def test_plan_rows_layouts_offload_and_skips():
    cfg = load_config("a14b_720p", ["gpus=[1,2,4,8]", "layouts=[auto,ulysses4,ulysses8]", "offload=true"])
    rows, skipped = plan_rows(cfg, available_gpus=4)
    assert [(r["gpus"], r["layout"]) for r in rows] == [(1, "single+offload"), (2, "gpus2"), (4, "gpus4"),
                                                        (4, "ulysses4")]
    assert rows[0]["render"]["placement"] == "offload" and rows[0]["render"]["t5_cpu"] is True
    assert rows[1]["render"]["placement"] == "auto"  # offload is the 1-GPU (24 GB card) setup only
    whys = {(s["gpus"], s["layout"]): s["why"] for s in skipped}
    assert "the render group has 2 GPUs" in whys[(2, "ulysses4")]
    assert whys[(8, "-")] == "only 4 GPUs on this machine"
    # ti2v-5B has 24 heads: an 8-way Ulysses layout... fits (24 % 8 == 0); a 16-way one does not
    rows, skipped = plan_rows(load_config("ti2v_5b_720p", ["gpus=[16]", "layouts=[auto]"]), None)
    assert rows == [] and "does not divide the model's 24 heads" in skipped[0]["why"]


def test_report_puts_anchors_beside_our_rows(smoke, tmp_path):
    _, report, _ = smoke
    rep = json.loads(json.dumps(report))
    rep.update(model="ti2v_5b", size="1280*704", frames=121, steps=50, timed_steps=2,
               scaled="scaled from 2 of 50 steps", anchors=[a.to_dict() for a in anchors_for("ti2v_5b", "1280*704")],
               failed=[{"gpus": 4, "layout": "gpus4", "error": "exit status 1: CUDA OOM", "log": "x.log"}])
    for r in rep["rows"]:
        r["scaled"] = rep["scaled"]
    md = markdown(rep)
    assert "claim: wanrender seed claim" in md and "| 540.0 |" in md and "| 68.0 |" in md
    assert "| 534.7 |" in md and "| 157.2 |" in md and "RTX 4090" in md
    assert "1041.5" not in md and "H100" not in md  # only this model's anchors
    assert "FAILED: 4 GPU(s) gpus4: exit status 1: CUDA OOM" in md
    assert md.count("scaled from 2 of 50 steps") >= 3  # each row, and the footnote
    paths = write_reports(rep, tmp_path, "x")
    assert [p.name for p in paths] == ["x.json", "x.md", "x.png"]
    assert {a.source for a in ANCHORS} and all(a.source and a.kind in ("claim", "published") for a in ANCHORS)
    run = subprocess.run([sys.executable, "-m", "benchmarks.report", str(paths[0]), str(paths[0]), "--out",
                          str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "c" / "combined.md").read_text().count("| 534.7 |") == 2


def test_worker_runs_without_hydra_omegaconf_ray_or_ffmpeg(tmp_path):
    """The GPU machines may have none of these: the worker (given the spec the driver composed) must still work,
    and the MP4 write is reported as not measured, with the reason. The row says which sampler stepped: Euler over
    3 of the 6 timesteps, or the shot's own UniPC when all 6 run."""
    for timed in (3, 6):
        cfg = load_config("smoke", [f"timed_steps={timed}"])  # the driver composes (Hydra), the worker gets plain data
        spec = worker_spec(cfg, plan_rows(cfg, None)[0][0], tmp_path / str(timed))
        (tmp_path / f"spec{timed}.json").write_text(json.dumps(spec))
    code = f"""
import json, sys
for m in ("hydra", "omegaconf", "ray", "ffmpeg"):
    sys.modules[m] = None  # any import of them now raises ImportError
from benchmarks.worker import run
from pathlib import Path
for timed in (3, 6):
    res = run(json.loads(Path({str(tmp_path)!r}, f"spec{{timed}}.json").read_text()))
    print(json.dumps({{"mp4": res["seconds"]["mp4_write"], "why": res["mp4_skipped"], "steps": res["step"]["n"],
                      "experts": res["experts_used"], "ran": res["sampler_ran"]}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    subset, full = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert subset == {"mp4": None, "why": "ffmpeg-python is not installed", "steps": 3, "experts": [0, 0, 1],
                      "ran": "euler over 3 of the 6 timesteps of the unipc schedule (the shot's unipc needs every step)"}
    assert full["steps"] == 6 and full["ran"].startswith("unipc (") and "6 steps" in full["ran"]  # the real one


def test_sigterm_takes_the_running_row_down(tmp_path):
    """`timeout N python -m benchmarks.scaling` on the GPU machine: the row's torchrun runs in its own session, so
    the driver must end it, or it would hold the GPUs after the call."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    drv = subprocess.Popen([sys.executable, "-m", "benchmarks.scaling", "bench=smoke", "gpus=[1]",
                            "inject_step_sleep_s=60", f"out={tmp_path}"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def row_processes() -> list[int]:
        pids = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and str(tmp_path) in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                continue
        return [p for p in pids if p != drv.pid]

    deadline = time.time() + 60
    while not row_processes() and time.time() < deadline:
        time.sleep(0.2)
    assert row_processes(), "the row never started"
    time.sleep(1.0)
    drv.send_signal(signal.SIGTERM)
    try:
        assert drv.wait(timeout=30) == 128 + signal.SIGTERM
        time.sleep(0.5)
        assert row_processes() == []
    finally:  # never leave a sleeping row behind when the assertion fails
        for pid in row_processes():
            os.kill(pid, signal.SIGKILL)
