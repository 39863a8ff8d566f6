"""The one config path: Hydra composes, Settings.from_config converts once; the job's kernel settings reach the
farm's render hashes."""
from pathlib import Path

import pytest

from jobs.manifest import read_manifest, validate_manifest
from jobs.plan import build_plan
from kernels.settings import KernelSettings
from renderer.conf import compose
from renderer.parallel.config import ParallelConfig
from renderer.pipeline import RenderOptions, ShotSpec
from renderer.presets import ModelPreset
from renderer.settings import ClusterSettings, JobSettings, Settings, SettingsError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_every_section_becomes_its_typed_object():
    s = Settings.from_config(compose(["model=tiny_ti2v", "prompt=a kite", "seed=5", "kernels.attention=math",
                                      "kernels.compile=off", "parallel=gpus4", "render.noise_device=device",
                                      "job.max_retries=4", "cluster.num_cpus=3"]))
    assert isinstance(s.model, ModelPreset) and s.model.name == "tiny_ti2v" and s.model.family == "wan22"
    assert isinstance(s.shot, ShotSpec) and (s.shot.prompt, s.shot.seed) == ("a kite", 5)
    assert isinstance(s.render, RenderOptions) and s.render.noise_device == "device"
    assert s.kernels == KernelSettings(attention="math", compile="off")
    assert isinstance(s.parallel, ParallelConfig) and s.parallel.world_size == 4
    assert isinstance(s.job, JobSettings) and s.job.max_retries == 4
    assert isinstance(s.cluster, ClusterSettings) and s.cluster.num_cpus == 3
    assert s.resolved["kernels"]["attention"] == "math"  # the composed config, kept for config.yaml / sidecars


def test_every_bad_value_is_named_at_once():
    with pytest.raises(SettingsError) as info:
        Settings.from_config(compose(["kernels.attention=fa9", "render.noise_device=gpu", "+job.retries=3"]))
    fields = [f for f, _ in info.value.problems]
    assert fields == ["kernels", "render", "job.retries"]
    assert "choose one of auto" in str(info.value) and "use cpu" in str(info.value)


def test_the_jobs_kernel_settings_are_in_every_render_hash():
    """A fast preview (other kernels) and the final render of the same shots never share a render hash, so the
    farm never skips the final render because a preview exists."""
    preset = Settings.from_config(compose([])).model
    manifest = validate_manifest(read_manifest(EXAMPLES / "previs.yaml"), preset, base_dir=EXAMPLES)
    final = build_plan(manifest, preset, "/nonexistent-out")
    preview = build_plan(manifest, preset, "/nonexistent-out", kernels=KernelSettings(allow_lossy=True))
    again = build_plan(manifest, preset, "/nonexistent-out", kernels=KernelSettings())
    assert [s.render_hash for s in final.shots] == [s.render_hash for s in again.shots]
    assert not {s.render_hash for s in final.shots} & {s.render_hash for s in preview.shots}


def test_farm_dry_run_refuses_bad_kernel_settings(tmp_path, capsys):
    from jobs.farm import run_job

    rc = run_job(compose([f"manifest={EXAMPLES / 'previs.yaml'}", f"out={tmp_path}", "dry_run=true",
                          "kernels.precision=fp4"]))
    assert rc == 2
    err = capsys.readouterr().err
    assert "kernels.precision='fp4'" in err and "nothing was rendered" in err
