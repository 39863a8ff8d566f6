"""benchmarks.nightly: regression rule, manifest checks, and real nights on an embedded Ray cluster with the tiny model."""
import json
from pathlib import Path

import pytest
import ray

from benchmarks.nightly import NightlyError, load_settings, read_history, regressions, run_nightly


def _rec(key="b | row", bench="b", run="r", sleep=0, **figures):
    return {"key": key, "benchmark": bench, "run_id": run, "date": "2026-11-21T00:00:00Z", "commit": "abc",
            "inject_step_sleep_s": sleep, "figures": figures}


def test_regression_is_measured_against_the_median_of_the_last_runs():
    history = [_rec(total_s=v, run=str(i)) for i, v in enumerate([100.0, 10.0, 11.0, 9.0, 10.0, 10.5])]
    # window 5: median of [10, 11, 9, 10, 10.5] = 10 (the old 100 s run has dropped out)
    assert regressions([_rec(total_s=10.9)], history, ["total_s"], {"b": 0.10}, 5) == []
    (r,) = regressions([_rec(total_s=11.2)], history, ["total_s"], {"b": 0.10}, 5)
    assert r["median"] == 10.0 and r["worse_by"] == pytest.approx(0.12) and r["runs"] == 5
    assert regressions([_rec(total_s=11.2)], history, ["total_s"], {"b": 0.15}, 5) == []  # the benchmark's margin
    assert regressions([_rec(total_s=11.2)], history, ["total_s"], {"b": 0.10}, 6) == []  # median of 6 = 10.25


def test_throughput_regresses_downwards_and_other_rows_do_not_count():
    history = [_rec(tflops_per_gpu=400.0), _rec(key="b | other row", tflops_per_gpu=100.0)]
    assert regressions([_rec(tflops_per_gpu=380.0)], history, ["tflops_per_gpu"], {}, 5) == []
    (r,) = regressions([_rec(tflops_per_gpu=300.0)], history, ["tflops_per_gpu"], {}, 5)
    assert r["worse_by"] == pytest.approx(0.25)
    assert regressions([_rec(key="b | new row", tflops_per_gpu=1.0)], history, ["tflops_per_gpu"], {}, 5) == []
    # a run with a planted sleep is never a baseline, and a missing figure is not compared
    planted = [_rec(total_s=1.0, sleep=0.5)]
    assert regressions([_rec(total_s=9.0)], planted, ["total_s"], {}, 5) == []
    assert regressions([_rec(total_s=None)], [_rec(total_s=1.0)], ["total_s"], {}, 5) == []


def test_manifest_problems_are_listed_together(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("figures: [total_s, speed]\nbenchmarks:\n  - {name: a, bench: smoke}\n  - {name: a, bench: nope}\n"
                 "  - {bench: smoke}\n  - {name: c, bench: smoke, overrides: [gpu=3]}\n")
    with pytest.raises(NightlyError) as e:
        load_settings([f"manifest={m}"])
    msg = str(e.value)
    for part in ("no conf/bench/nope.yaml", "needs `name` and `bench`", "'a' is used twice", "figure 'speed' unknown",
                 "benchmarks[3] c:"):
        assert part in msg, msg
    with pytest.raises(NightlyError, match="unknown setting"):
        load_settings([f"manifest={m}", "margn=0.1"])


def test_default_manifest_is_valid():
    s = load_settings([])
    names = [b["name"] for b in s["benchmarks"]]
    assert names == ["ti2v_5b_720p", "t2v_a14b_720p", "tiny_cpu"] and s["margin"] == 0.10 and s["window"] == 5
    assert [b["tiny"] for b in s["benchmarks"]] == [False, False, True]


@pytest.fixture(scope="module")
def ray_cluster():
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_nights_on_the_embedded_cluster(ray_cluster, tmp_path, capsys):
    manifest = tmp_path / "nightly.yaml"
    # gpus=[1]: one row keeps the test short; margin 300 %: tiny CPU timings on a shared 2-core box are noisy,
    # and the planted sleep below slows the row down ~5-50×
    manifest.write_text(f"history: {tmp_path}/history.jsonl\nplot: {tmp_path}/trend.png\nout: {tmp_path}/runs\n"
                        "margin: 3.0\nwindow: 5\nfigures: [total_s, step_median_s]\nbenchmarks:\n"
                        "  - {name: tiny_cpu, bench: smoke, overrides: ['gpus=[1]', 'cpu_threads=1']}\n"
                        "  - {name: big, bench: a14b_720p}\n")
    settings = load_settings([f"manifest={manifest}"])
    assert run_nightly(settings) == 0  # first night: nothing to compare with
    out = capsys.readouterr().out
    assert "big: skipped, a full-size model needs GPUs" in out
    assert run_nightly(settings) == 0  # a normal night passes
    hist = read_history(tmp_path / "history.jsonl")
    assert len(hist) == 2 and hist[0]["key"] == hist[1]["key"] and hist[0]["run_id"] != hist[1]["run_id"]
    assert hist[0]["scaled"] == "scaled from 2 of 6 steps" and hist[0]["device"].startswith("CPU")
    assert len(hist[0]["commit"]) >= 40 and hist[0]["figures"]["total_s"] > 0
    capsys.readouterr()

    planted = load_settings([f"manifest={manifest}", "inject_step_sleep_s=0.5"])  # the planted regression
    assert run_nightly(planted) == 1
    out = capsys.readouterr().out
    assert "REGRESSION tiny_cpu | tiny_t2v" in out and "step_median_s" in out and "margin 300%" in out
    hist = read_history(tmp_path / "history.jsonl")
    assert len(hist) == 3 and hist[-1]["inject_step_sleep_s"] == 0.5
    png = (tmp_path / "trend.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000

    # fake history with much faster figures: an ordinary night is flagged against it
    fast = {**hist[0], "run_id": "fake", "figures": {k: (v / 20 if v else v) for k, v in hist[0]["figures"].items()}}
    with open(tmp_path / "history.jsonl", "a") as fh:
        fh.write("not json, a line cut short by a crash\n")
        for _ in range(5):
            fh.write(json.dumps(fast) + "\n")
    assert run_nightly(settings) == 1
    assert "REGRESSION tiny_cpu" in capsys.readouterr().out
    assert len(Path(tmp_path / "history.jsonl").read_text().splitlines()) == 3 + 1 + 5 + 1
