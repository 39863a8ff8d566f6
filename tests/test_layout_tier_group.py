"""The layout chosen from the tier, end to end on CPU with gloo: `torchrun ... wanrender generate parallel=gpus2` of a
draft (guidance 1) runs as ulysses2 and equals the one-process render; a farm group started as gpus2 renders the
drafts as ulysses2 and the finals as cfg2 (job.tiers=[draft, exact]), each equal to its one-process render."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from renderer.cli import main
from renderer.video_io import read_json, read_video

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model=tiny_t2v", "prompt=a red kite over a beach", "steps=2", "seed=4", "size=64*48", "frames=5",
          "render.progress=false"]


def _torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--standalone",
           "-m", "renderer.cli", "generate", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _max_diff(a: Path, b: Path) -> int:
    return int(np.abs(read_video(a).astype(int) - read_video(b).astype(int)).max())


def test_cli_draft_on_gpus2_runs_ulysses2_and_equals_one_process(tmp_path):
    assert main(["generate", *COMMON, "quality=draft", f"out={tmp_path / 'one'}"]) == 0
    run = _torchrun(2, [*COMMON, "quality=draft", "parallel=gpus2", f"out={tmp_path / 'two'}"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("parallel: shot shot runs without CFG (one forward per step): layout cfg2 -> ulysses2 on the same 2 GPUs"
            in run.stdout)
    assert _max_diff(tmp_path / "one" / "shot.draft.mp4", tmp_path / "two" / "shot.draft.mp4") <= 1
    side = read_json(tmp_path / "two" / "shot.draft.json")
    assert side["parallel"]["configured"] == "cfg2" and side["parallel"]["effective"] == "ulysses2"
    assert side["parallel"]["folded_idle_cfg"] is True
    assert side["config"]["parallel"]["cfg"] == 2  # the configured layout stays in the config record
    assert side["render_hash"] == read_json(tmp_path / "one" / "shot.draft.json")["render_hash"]


def test_cli_fold_turned_off_keeps_cfg2(tmp_path):
    run = _torchrun(2, [*COMMON, "guidance=1.0", "parallel=gpus2", "parallel.fold_idle_cfg=false",
                        f"out={tmp_path}"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "runs without CFG" not in run.stdout
    side = read_json(tmp_path / "shot.json")
    assert side["parallel"]["effective"] == "cfg2" and side["parallel"]["folded_idle_cfg"] is False


def test_farm_group_renders_drafts_as_ulysses2_and_finals_as_cfg2(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    from jobs.farm import run_job
    from renderer.conf import compose

    raw = {"name": "fold", "model": "tiny_t2v", "defaults": {"size": "64*48", "frames": 5, "steps": 2},
           "shots": [{"id": "s0", "prompt": "a red kite over a beach", "seed": 4}]}
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(raw))
    out = tmp_path / "farm"
    assert not ray.is_initialized()
    # address="local": our own cluster, never one another test or engineer left running
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        rc = run_job(compose([f"manifest={manifest}", f"out={out}", "render.device=cpu", "job.live_progress=false",
                              "job.tiers=[draft,exact]", "job.max_groups=1", "cluster=local", "parallel=gpus2"]))
    finally:
        ray.shutdown()
    assert rc == 0
    assert ("layout: 1 shot(s) without CFG (s0.draft) run as ulysses2 on the cfg2 groups "
            "(parallel.fold_idle_cfg=false keeps cfg2)") in capsys.readouterr().out
    draft, final = read_json(out / "s0.draft.json"), read_json(out / "s0.json")
    assert (draft["parallel"]["effective"], final["parallel"]["effective"]) == ("ulysses2", "cfg2")
    assert draft["job"]["group"] == final["job"]["group"]  # one group, both layouts
    report = read_json(out / "report.json")
    layouts = {s["id"]: s["attempts"][-1]["layout"]["effective"] for s in report["shots"]}
    assert layouts == {"s0.draft": "ulysses2", "s0": "cfg2"}
    assert (out / "report.html").read_text().count(" as ulysses2") == 1  # the draft's attempt line says so
    # each equals the one-process render of the same shot and tier
    common = ["model=tiny_t2v", "prompt=a red kite over a beach", "steps=2", "seed=4", "size=64*48", "frames=5",
              "render.progress=false", "render.device=cpu", "name=s0"]
    assert main(["generate", *common, "quality=draft", f"out={tmp_path / 'one'}"]) == 0
    assert main(["generate", *common, f"out={tmp_path / 'one'}"]) == 0
    assert _max_diff(out / "s0.draft.mp4", tmp_path / "one" / "s0.draft.mp4") <= 1
    assert _max_diff(out / "s0.mp4", tmp_path / "one" / "s0.mp4") <= 1


def test_scaling_harness_draft_row_on_two_ranks_runs_ulysses2(tmp_path):
    """bench=smoke on 2 gloo ranks, quality draft, layout auto (gpus2.yaml): the row ran as ulysses2."""
    from benchmarks.scaling import load_config, run_scaling

    cfg = load_config("smoke", ["gpus=[2]", "qualities=[draft]", f"out={tmp_path}", "check=false"])
    rc, report = run_scaling(cfg)
    assert rc == 0 and not report["failed"], report["failed"]
    (row,) = report["rows"]
    assert row["layout"] == "ulysses2+draft" and row["layout_from"].startswith("auto: gpus2")
    assert row["parallel"].startswith("cfg1×ulysses2×ring1 (2 GPUs") and row["forwards_per_step"] == 1


def _animate_inputs(tmp: Path) -> list[str]:
    """A tiny Animate shot's inputs: a portrait reference image, a 13-frame pose video and a face video."""
    from PIL import Image

    from renderer.video_io import write_mp4

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(tmp / "ref.png")
    write_mp4(rng.integers(0, 255, (13, 48, 64, 3), dtype=np.uint8), tmp / "pose.mp4", fps=30)
    write_mp4(rng.integers(0, 255, (13, 16, 16, 3), dtype=np.uint8), tmp / "face.mp4", fps=30)
    return ["model=tiny_animate", f"image={tmp / 'ref.png'}", f"pose_video={tmp / 'pose.mp4'}",
            f"face_video={tmp / 'face.mp4'}", "mode=animate", "name=take1", "steps=2", "seed=3", "refert_num=1",
            "render.progress=false"]


def test_cli_animate_on_gpus2_runs_ulysses2_and_equals_one_process(tmp_path):
    """Animate runs at guidance 1 (one forward per step): a gpus2 group renders it as ulysses2."""
    args = _animate_inputs(tmp_path)
    assert main(["generate", *args, f"out={tmp_path / 'one'}"]) == 0
    run = _torchrun(2, [*args, "parallel=gpus2", f"out={tmp_path / 'two'}"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "parallel: shot take1 runs without CFG (one forward per step): layout cfg2 -> ulysses2" in run.stdout
    assert _max_diff(tmp_path / "one" / "take1.mp4", tmp_path / "two" / "take1.mp4") <= 1


def test_launch_switches_layout_per_render_and_checks_each(tmp_path):
    """`python -m renderer.parallel.launch --parallel gpus2 --guidance 1 5 1 --check` (the GPU check's CPU path):
    one group, ulysses2 / cfg2 / ulysses2, each render against one process."""
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m",
                          "renderer.parallel.launch", "--parallel", "gpus2", "--guidance", "1", "5", "1", "--check"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["layout"] for r in report["renders"]] == ["ulysses2", "cfg2", "ulysses2"]
    assert all(r["max_rel_err"] <= 1e-5 for r in report["renders"]), report["renders"]
    assert report["meshes"] == 2
