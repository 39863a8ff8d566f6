"""Animate shots on the farm: a manifest with an animate and a replace shot, raw plates in, MP4s out at the plate's
length with its audio, through the embedded Ray cluster (our own, address="local"), the tiny_animate model and the
tiny stand-in preprocessing models. Plus the plan / manifest rules for these shots, without Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.prepare_helpers import PLATE_FPS, PLATE_FRAMES, character, plate, tiny_ckpt  # noqa: F401

from jobs.farm import run_job
from renderer.conf import compose
from renderer.video_io import read_json, read_mp4_metadata, sidecar_path, video_info

FPS = 30
FRAMES = int(PLATE_FRAMES / PLATE_FPS * FPS)  # 15: the plate's count at the render fps


def _lora(path: Path, scale_seed: int = 0) -> Path:
    """A PEFT state dict (the relighting LoRA's layout) for two Linears of tiny_animate's first block."""
    from renderer.families.animate.model import build_animate
    from renderer.presets import load_preset

    model = build_animate(load_preset("tiny_animate").dit, dtype=torch.float32, device=torch.device("cpu"), seed=0)
    g = torch.Generator().manual_seed(scale_seed)
    state = {}
    for name in ("blocks.0.self_attn.q", "blocks.0.ffn.0"):
        out_f, in_f = model.get_submodule(name).weight.shape
        state[f"{name}.lora_A.weight"] = torch.randn(2, in_f, generator=g) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(out_f, 2, generator=g) * 0.1
    torch.save({"state_dict": state}, path)
    return path


def _manifest(folder: Path, plate_path: Path, image: Path, **replace_extra) -> Path:
    shots = [{"id": "dance", "task": "animate", "video": str(plate_path), "image": str(image), "seed": 3},
             {"id": "swap", "task": "replace", "video": str(plate_path), "image": str(image), "seed": 4,
              "refert_num": 5, **replace_extra}]
    path = folder / "animate.yaml"
    path.write_text(yaml.safe_dump({"name": "animfarm", "model": "tiny_animate",
                                    "defaults": {"steps": 2, "prompt": "a figure on a stage"}, "shots": shots}))
    return path


def _args(manifest: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [f"manifest={manifest}", f"out={out}", "render.device=cpu", "job.live_progress=false",
            "job.max_groups=1", "job.max_retries=0", f"prepare.checkpoint={ckpt}",
            f"prepare.sam2_config={ckpt}/sam2/tiny_sam2.yaml", "prepare.area=[160,96]", *extra]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rendered(ray_cluster, tmp_path_factory, tiny_ckpt, plate, character):  # noqa: F811
    base = tmp_path_factory.mktemp("animfarm")
    lora = _lora(base / "relight.ckpt")
    manifest = _manifest(base, plate, character, loras=[{"path": "relight.ckpt", "scale": 0.5}])
    out = base / "out"
    rc = run_job(compose(_args(manifest, out, tiny_ckpt)))
    return manifest, out, rc, lora


def test_animate_and_replace_shots_render_end_to_end(rendered, plate):  # noqa: F811
    from renderer.prepare.audio import audio_duration, has_audio
    from renderer.prepare.footage import file_sha256

    manifest, out, rc, lora = rendered
    rep = json.loads((out / "report.json").read_text())
    assert rc == 0 and rep["counts"] == {"done": 2}, rep["counts"]
    plate_sha = file_sha256(plate)
    for sid, mode, refert, size in (("dance", "animate", 1, (96, 160)), ("swap", "replace", 5, (160, 96))):
        mp4 = out / f"{sid}.mp4"
        info = video_info(mp4)  # read back: exactly the plate's frames and duration at the render fps
        assert (info["frames"], info["fps"], (info["width"], info["height"])) == (FRAMES, FPS, size), sid
        assert has_audio(mp4) and abs(audio_duration(mp4) - FRAMES / FPS) < 0.025  # the plate's sound, no drift
        side = read_json(sidecar_path(mp4))
        assert side["mode"] == mode and side["task"] == mode and side["refert_num"] == refert
        assert side["plate_sha256"] == plate_sha and side["preprocessing"]["plate"]["sha256"] == plate_sha
        assert side["preprocessing"]["models"]["detector"].endswith("det/yolov10m.onnx")
        assert side["preprocessing"]["settings"]["area"] == [160, 96]
        assert side["frames"] == FRAMES and side["duration_s"] == pytest.approx(FRAMES / FPS)
        assert side["render_hash"] == next(s["render_hash"] for s in rep["shots"] if s["id"] == sid)
        assert side["clips"] == (2 if refert == 1 else 3)  # clips of 9 frames (tiny_animate) cover 15 frames
        tags = read_mp4_metadata(mp4)  # the provenance record's tags survive the audio mux
        assert tags.get("ai_generated") == "true"
        assert tags.get("seed") == str(side["seed"]) == str(side["provenance"]["seed"])
        assert side["safety"]["held"] is False and side["safety"]["frames_checked"]  # screened like every shot
        assert side["label"] is False and side["c2pa_signed"] is False
    assert read_json(sidecar_path(out / "swap.mp4"))["loras"] == [{"path": str(lora), "scale": 0.5,
                                                                   "mode": "unmerged"}]
    assert read_json(sidecar_path(out / "dance.mp4"))["loras"] == []
    assert read_json(sidecar_path(out / "swap.mp4"))["preprocessing"]["models"]["sam2"].endswith(".pt")
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".mux-*"))  # nothing half-written left behind
    # the contact sheet: plate, preprocessing preview and result side by side for each Animate shot
    page = (out / "report.html").read_text()
    for sid in ("dance", "swap"):
        for which in ("plate", "preview", "first", "last"):
            assert f'data-shot="{sid}" data-which="{which}"' in page, (sid, which)
        assert page.index(f'data-shot="{sid}" data-which="plate"') < page.index(f'data-shot="{sid}" data-which="first"')


def test_resubmitting_finds_animate_shots_done(rendered, tiny_ckpt):  # noqa: F811
    manifest, out, rc, _ = rendered
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    assert run_job(compose(_args(manifest, out, tiny_ckpt))) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == before  # nothing re-rendered
    assert {s["status"] for s in json.loads((out / "report.json").read_text())["shots"]} == {"skipped"}
    page = (out / "report.html").read_text()  # the contact sheet still shows plate and preview (from the sidecar)
    for sid in ("dance", "swap"):
        assert f'data-shot="{sid}" data-which="plate"' in page and f'data-shot="{sid}" data-which="preview"' in page


# -- without Ray: the manifest and the plan ------------------------------------------------------------------------
def _plan(tmp_path, plate, character, ckpt, *extra, **replace_extra):  # noqa: F811
    from jobs.farm import prepare

    manifest = _manifest(tmp_path, plate, character, **replace_extra)
    return prepare(compose(_args(manifest, tmp_path / "out", ckpt, *extra)))[0]


def test_plan_takes_frames_and_size_from_the_plate_and_hashes_what_changes_it(tmp_path, tiny_ckpt, plate,
                                                                              character):  # noqa: F811
    _lora(tmp_path / "l.ckpt")
    plan = _plan(tmp_path, plate, character, tiny_ckpt, loras=["l.ckpt:0.5"])
    shots = {p.id: p for p in plan.shots}
    assert (shots["dance"].spec.frames, shots["dance"].spec.size) == (FRAMES, "96*160")  # the character's shape
    assert (shots["swap"].spec.frames, shots["swap"].spec.size) == (FRAMES, "160*96")  # the plate's shape
    assert shots["swap"].request.loras == [(str(tmp_path / "l.ckpt"), 0.5)]
    hashes = {p.id: p.render_hash for p in plan.shots}
    assert _plan(tmp_path, plate, character, tiny_ckpt, loras=["l.ckpt:0.5"]).shots[0].render_hash == hashes["dance"]
    changed = {p.id: p.render_hash for p in _plan(tmp_path, plate, character, tiny_ckpt, loras=["l.ckpt:0.8"]).shots}
    assert changed["dance"] == hashes["dance"] and changed["swap"] != hashes["swap"]  # the LoRA scale
    area = {p.id: p.render_hash for p in _plan(tmp_path, plate, character, tiny_ckpt, "prepare.area=[320,192]",
                                               loras=["l.ckpt:0.5"]).shots}
    assert area["dance"] != hashes["dance"] and area["swap"] != hashes["swap"]  # the preprocessing settings


def test_bad_animate_shots_are_refused_before_anything_is_reserved(tmp_path, tiny_ckpt, plate, character,
                                                                   capsys):  # noqa: F811
    manifest = _manifest(tmp_path, plate, character, loras=["missing.safetensors", "relighting"], refert_num=3)
    assert run_job(compose(_args(manifest, tmp_path / "out", tiny_ckpt))) == 2
    err = capsys.readouterr().err
    assert "shot swap: refert_num: refert_num=3: use 1 or 5" in err
    assert "shot swap: loras: 'relighting' needs model.checkpoint" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    manifest = _manifest(tmp_path, plate, character, loras=["missing.safetensors"])
    assert run_job(compose(_args(manifest, tmp_path / "out", tiny_ckpt))) == 2
    assert f"shot swap: loras: LoRA file {tmp_path / 'missing.safetensors'} does not exist" in capsys.readouterr().err
    fast = _manifest(tmp_path, plate, character)  # drafts are allowed (tests/test_animate_draft_farm.py); fast not
    assert run_job(compose(_args(fast, tmp_path / "out", tiny_ckpt, "job.tiers=[fast,exact]"))) == 2
    assert "shot dance: quality fast: not available for Animate shots" in capsys.readouterr().err


def test_task_is_the_animate_mode_in_one_place():
    from renderer.families import get_family
    from renderer.families.animate import TASK_MODES, mode_of_task

    assert mode_of_task("animate") == "animate" and mode_of_task("replace") == "replace"
    assert set(get_family("animate").tasks) == set(TASK_MODES)
    with pytest.raises(ValueError, match="not an Animate task"):
        mode_of_task("t2v")


def test_a_rank_reloads_its_dit_for_another_shots_loras(tmp_path):
    from jobs.animate_shots import AnimateShots
    from renderer.lora import LoraLinear
    from renderer.pipeline import RenderOptions
    from renderer.presets import load_preset

    path = str(_lora(tmp_path / "l.ckpt"))
    shots = AnimateShots(load_preset("tiny_animate"), RenderOptions(device="cpu", progress=False))
    plain = shots.stack.model.blocks[0].self_attn.q
    assert not isinstance(plain, LoraLinear)
    shots._use_loras([(path, 0.5)])
    q = shots.stack.model.blocks[0].self_attn.q
    assert isinstance(q, LoraLinear) and q.lora_scales == [0.5] and shots.stack.loras == ((path, 0.5),)
    before = shots.stack
    shots._use_loras([[path, 0.5]])  # the same LoRAs (as Ray ships them: lists): no reload
    assert shots.stack is before
    shots._use_loras([])  # a shot without LoRAs gets the plain weights back
    q = shots.stack.model.blocks[0].self_attn.q
    assert not isinstance(q, LoraLinear) and torch.equal(q.weight, plain.weight)


def test_a_manifest_mask_replaces_the_tracked_one(tmp_path):
    import numpy as np
    from PIL import Image

    from jobs.animate_shots import user_mask
    from renderer.video_io import write_mp4

    still = np.zeros((40, 64, 3), np.uint8)
    still[:, 32:] = 255  # right half = character
    Image.fromarray(still).save(tmp_path / "m.png")
    m = user_mask(str(tmp_path / "m.png"), 5, 20, 32)
    assert m.shape == (5, 20, 32) and m[:, :, 16:].eq(1).all() and m[:, :, :16].eq(0).all()
    video = np.zeros((3, 40, 64, 3), np.uint8)
    video[2] = 255  # only the last frame is all character
    write_mp4(video, tmp_path / "m.mp4", fps=30)
    m = user_mask(str(tmp_path / "m.mp4"), 5, 20, 32)  # 3 frames stretched over 5: the last two from frame 2
    assert [int(f.mean().round()) for f in m] == [0, 0, 0, 1, 1]  # frames 0 0 1 2 2 (round half to even)


def test_a_prepared_folder_whose_plate_is_gone_is_refused(tmp_path, tiny_ckpt, plate, character, capsys):  # noqa: F811
    import shutil

    from jobs.farm import prepare as plan_job
    from renderer.prepare import PrepareSettings, prepare

    moved = tmp_path / "plate.mp4"
    shutil.copy(plate, moved)
    folder = tmp_path / "prep"
    prepare(moved, character, folder, PrepareSettings(area=(160, 96)), checkpoint_root=tiny_ckpt, progress=False)
    manifest = tmp_path / "one.yaml"
    manifest.write_text(yaml.safe_dump({"model": "tiny_animate", "shots": [
        {"id": "dance", "task": "animate", "video": str(folder), "image": str(character), "prompt": "a figure"}]}))
    shot = plan_job(compose(_args(manifest, tmp_path / "out", tiny_ckpt)))[0].shots[0]
    assert (shot.spec.frames, shot.spec.size) == (FRAMES, "96*160")  # read from the folder's meta.json
    assert run_job(compose(_args(manifest, tmp_path / "out", tiny_ckpt, "prepare.fps=24"))) == 2
    assert "prepare.fps=24 but tiny_animate renders at 30 fps" in capsys.readouterr().err
    moved.unlink()
    assert run_job(compose(_args(manifest, tmp_path / "out", tiny_ckpt))) == 2
    assert f"shot dance: video: the plate {moved} that {folder} was prepared from is gone" in capsys.readouterr().err
