"""Issue 15, item 1: every input error is caught before any GPU (or Ray) is reserved, with one clear message and
exit code 2. Each case here was reproduced on the code before the fix (it passed bad input, or failed with a
traceback / torch's advice)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from jobs.farm import run_job
from jobs.manifest import ManifestError, parse_csv, validate_manifest
from renderer.cli import main
from renderer.conf import compose
from renderer.families.wan22.model import DiTConfig, WanDiT
from renderer.presets import load_preset

ROOT = Path(__file__).resolve().parents[1]
T2V = load_preset("tiny_t2v")


def shot(i: int = 1, **over) -> dict:
    return {"id": f"sh{i:03d}", "prompt": "a lighthouse in the rain", "seed": i, **over}


def problems(raw: dict, preset=T2V) -> list[str]:
    with pytest.raises(ManifestError) as info:
        validate_manifest(raw, preset)
    return [str(p) for p in info.value.problems]


def dry_run(manifest: Path, out: Path, *extra: str) -> int:
    return run_job(compose([f"manifest={manifest}", f"out={out}", "dry_run=true", *extra]))


# -- numbers: finite and bounded ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,words", [
    ("guidance", float("nan"), "guidance must be a finite number"),
    ("guidance", float("inf"), "guidance must be a finite number"),
    ("guidance", [3.0, float("nan")], "guidance must be a finite number"),
    ("guidance", 1e6, "guidance 1e+06 is above"),
    ("shift", float("inf"), "shift must be a finite number"),
    ("shift", 1e9, "above"),
    ("steps", 10000, "steps 10000 is above tiny_t2v's limit"),
    ("frames", 100001, "frames 100001 is above tiny_t2v's limit"),
])
def test_non_finite_and_out_of_bound_numbers_are_refused(field, value, words):
    found = problems({"shots": [shot(**{field: value})]})
    assert any(p.startswith(f"shot sh001: {field}:") and words in p for p in found), found


def test_nan_guidance_in_a_yaml_manifest_stops_the_dry_run(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text("model: tiny_t2v\nshots:\n  - {id: a, prompt: x, guidance: .nan}\n  - {id: b, prompt: y, "
                    "shift: .inf}\n")
    assert dry_run(path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "shot a: guidance: guidance must be a finite number" in err and "shot b: shift:" in err
    assert "Traceback" not in err and not ray.is_initialized()


@pytest.mark.parametrize("override,field", [("guidance=nan", "guidance"), ("shift=inf", "shift"),
                                            ("steps=10000", "steps"), ("frames=100001", "frames")])
def test_generate_refuses_bad_numbers_before_a_model_loads(tmp_path, capsys, monkeypatch, override, field):
    import renderer.pipeline

    monkeypatch.setattr(renderer.pipeline.Pipeline, "__init__", _no_model)
    assert main(["generate", "prompt=a kite", f"out={tmp_path / 'o'}", override]) == 2
    assert f"shot shot: {field}:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _no_model(*a, **k):
    raise AssertionError("a model was loaded for a bad request")


# -- ids and the CSV header -----------------------------------------------------------------------------------------
def test_an_id_with_a_trailing_space_is_an_error_not_trimmed():
    raw = parse_csv("id,prompt\nsh010 ,a boat\n")
    found = problems(raw)
    assert any("'sh010 '" in p and "space" in p for p in found), found
    found = problems({"shots": [shot(id=" sh011")]})
    assert any("' sh011'" in p and "space" in p for p in found), found


def test_csv_header_hint_suggests_the_right_field():
    found = problems(parse_csv("shot_id,prompt\nsh010,a boat\n"))
    assert any("shot_id: unknown field: did you mean 'id'?" in p for p in found), found
    found = problems(parse_csv("id,prompt,negative\nsh010,a boat,blur\n"))
    assert any("did you mean 'negative_prompt'?" in p for p in found), found


# -- images fully decoded -------------------------------------------------------------------------------------------
@pytest.fixture
def truncated_jpeg(tmp_path) -> Path:
    path = tmp_path / "frame.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # a copy cut short: the header is intact, the pixels are not
    return path


def test_truncated_jpeg_fails_validation(truncated_jpeg, tmp_path, capsys, monkeypatch):
    found = problems({"model": "tiny_i2v", "shots": [shot(image=str(truncated_jpeg))]}, load_preset("tiny_i2v"))
    assert any("image:" in p and "cannot be read" in p for p in found), found
    import renderer.pipeline

    monkeypatch.setattr(renderer.pipeline.Pipeline, "__init__", _no_model)
    assert main(["generate", "model=tiny_i2v", "prompt=x", f"image={truncated_jpeg}", f"out={tmp_path}/o"]) == 2
    assert "cannot be read" in capsys.readouterr().err


# -- help and exit codes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "render", "config"])
def test_help_for_every_subcommand(command):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for flag in ("--help", "-h"):
        p = subprocess.run([sys.executable, "-m", "renderer.cli", command, flag], capture_output=True, text=True,
                           env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        assert f"wanrender {command}" in p.stdout and "Traceback" not in p.stderr + p.stdout


def test_unknown_override_is_exit_2_without_traceback():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "renderer.cli", "render", "manifest=x.yaml", "job.max_retrys=3"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "max_retrys" in p.stderr


# -- precedence: command line > shot > manifest defaults -----------------------------------------------------------
def test_command_line_model_beats_the_manifest_and_says_so(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny_t2v", "defaults": {"steps": 3},
                                    "shots": [shot(1), shot(2, steps=5)]}))
    assert dry_run(path, tmp_path / "out", "model=tiny_ti2v", "job.shot_defaults.steps=2") == 0
    out = capsys.readouterr().out
    assert "model tiny_ti2v" in out
    lines = [ln for ln in out.splitlines() if "command line" in ln and "overrides the manifest" in ln]
    assert any("model=tiny_ti2v" in ln and "tiny_t2v" in ln for ln in lines), out
    assert any("steps=2" in ln for ln in lines), out
    rows = [ln.split() for ln in out.splitlines() if ln.rstrip().endswith(".mp4")]
    assert [r[6] for r in rows] == ["2", "2"]  # the command line beats the shot's own steps: 5


def test_manifest_model_takes_the_command_line_checkpoint(tmp_path, capsys):
    """`model: t2v_a14b` in the manifest + model.checkpoint=... on the command line: the checkpoint is used (today
    the answer was 'needs its weights: model.checkpoint=...', the flag just given)."""
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"model": "t2v_a14b", "shots": [shot(1)]}))
    empty = tmp_path / "ckpt"
    empty.mkdir()
    assert dry_run(path, tmp_path / "out", f"model.checkpoint={empty}") == 2
    err = capsys.readouterr().err
    assert "needs its weights" not in err and str(empty) in err and "model.checkpoint" in err


# -- the checkpoint folder, checked in the dry run -----------------------------------------------------------------
def write_tiny_official(root: Path, preset) -> None:
    """An official-layout folder for a tiny preset: the experts' shards (real headers), no T5 / VAE yet."""
    for i, name in enumerate(preset.experts):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        c = preset.dit
        torch.manual_seed(i)
        with torch.device("cpu"):
            model = WanDiT(c)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in c.to_dict().items()}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("case", ["missing", "empty", "garbage_pth", "wrong_shape"])
def test_bad_checkpoint_folder_fails_the_dry_run(tmp_path, capsys, case):
    from renderer.encoders.text import OFFICIAL_T5_FILE

    root = tmp_path / "ckpt"
    if case != "missing":
        root.mkdir()
    if case in ("garbage_pth", "wrong_shape"):
        write_tiny_official(root, T2V)
        (root / OFFICIAL_T5_FILE).write_bytes(b"this is not a checkpoint at all" * 10)
    if case == "wrong_shape":
        cfg = json.loads((root / "low_noise_model" / "config.json").read_text())
        cfg["ffn_dim"] *= 2
        (root / "low_noise_model" / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"shots": [shot(1)]}))
    assert dry_run(path, tmp_path / "out", f"model.checkpoint={root}") == 2
    err = capsys.readouterr().err
    assert "model.checkpoint" in err and str(root) in err
    assert "weights_only=False" not in err and "Traceback" not in err and not ray.is_initialized()
    if case == "garbage_pth":
        assert OFFICIAL_T5_FILE in err and "not a PyTorch checkpoint" in err
    if case == "wrong_shape":
        assert "shape" in err and "low_noise_model" in err


def test_checkpoint_check_reads_no_tensor(tmp_path, monkeypatch):
    """The check uses the headers only: a tensor read would go through safe_open(...).get_tensor."""
    from renderer.preflight import check_checkpoint
    from renderer.encoders.text import OFFICIAL_T5_FILE

    root = tmp_path / "ckpt"
    write_tiny_official(root, T2V)
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, root / OFFICIAL_T5_FILE)
    # a Wan2.2 VAE (12 input channels) where the model needs Wan2.1: told from the shapes in the metadata
    torch.save({"encoder.conv1.weight": torch.zeros(8, 12, 3, 3, 3), "decoder.conv1.weight": torch.zeros(8, 4)},
               root / "Wan2.1_VAE.pth")
    import safetensors

    real = safetensors.safe_open

    class NoTensors:
        def __init__(self, *a, **k):
            self._h = real(*a, **k)

        def __enter__(self):
            self._h.__enter__()
            return self

        def __exit__(self, *exc):
            return self._h.__exit__(*exc)

        def keys(self):
            return self._h.keys()

        def get_slice(self, k):
            return self._h.get_slice(k)

        def get_tensor(self, k):
            raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors, "safe_open", NoTensors)
    found = check_checkpoint(T2V, root)
    # the experts pass; what is left is the missing tokenizer and VAE, each named
    assert found and all("high_noise_model" not in p and "low_noise_model" not in p for p in found), found
    assert any("umt5-xxl" in p for p in found), found
    assert any("a Wan2.2 VAE, the model needs Wan2.1" in p for p in found), found
    assert not any("text encoder" in p for p in found), found


# -- the output folder ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, *options: str, monkeypatch=None):
    """A tiny tmpfs at `path` (root may mount one, as here). Where mounting is not permitted (a container without
    CAP_SYS_ADMIN), `path` is a plain folder and the same fault is injected where the code meets it: a read-only
    mount as EROFS from the write probe, the size as the free space statvfs reports. Yields (path, mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}",) + options), "tmpfs", str(path)]
    if os.environ.get("WANRENDER_TEST_NO_MOUNT"):  # exercise the injected fallback on a machine that can mount
        cmd = ["false"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        if monkeypatch is None:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}) and this test has no injected fallback")
        _inject_small_disk(monkeypatch, path, size, "ro" in options)
        yield path, False
        return
    try:
        yield path, True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _inject_small_disk(monkeypatch, root: Path, size: str, read_only: bool) -> None:
    import errno
    import shutil
    import tempfile

    import renderer.preflight as pf

    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    total = int(size[:-1]) * units[size[-1].lower()] if size[-1].isalpha() else int(size)
    inside = lambda d: Path(d).absolute().is_relative_to(root.absolute())  # noqa: E731
    real_tmp, real_usage = tempfile.NamedTemporaryFile, shutil.disk_usage

    def probe(*a, dir=None, **k):
        if read_only and dir is not None and inside(dir):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_tmp(*a, dir=dir, **k)

    def usage(where):
        if inside(where):
            used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            return shutil._ntuple_diskusage(total, used, max(0, total - used))
        return real_usage(where)

    monkeypatch.setattr(pf.tempfile, "NamedTemporaryFile", probe)
    monkeypatch.setattr(pf.shutil, "disk_usage", usage)


def test_read_only_output_folder_is_exit_2_before_any_render(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"shots": [shot(1)]}))
    with small_tmpfs(tmp_path / "ro", "1m", "ro", monkeypatch=monkeypatch) as (ro, _):
        rc = run_job(compose([f"manifest={path}", f"out={ro}/out"]))
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and not ray.is_initialized()
        assert f"{ro}" in err and "not writable" in err and "out=" in err
        import renderer.pipeline

        monkeypatch.setattr(renderer.pipeline.Pipeline, "__init__", _no_model)
        assert main(["generate", "prompt=a kite", f"out={ro}/gen"]) == 2
        assert "not writable" in capsys.readouterr().err


def test_output_folder_without_room_for_the_job_is_refused(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"frames": 5}, "shots": [shot(i) for i in range(40)]}))
    with small_tmpfs(tmp_path / "small", "64k", monkeypatch=monkeypatch) as (small, _):
        assert dry_run(path, small / "out") == 2
        err = capsys.readouterr().err
        assert "room" in err and "free" in err and "out=" in err
        assert not (small / "out").exists()


def write_complete_tiny_official(root: Path, preset) -> None:
    """Every file the official layout has, for a tiny preset: experts, UMT5 .pth (official names), tokenizer,
    VAE .pth. What a real Wan-AI download looks like, small enough to load in a second."""
    from renderer.encoders.text import (OFFICIAL_T5_FILE, OFFICIAL_TOKENIZER_DIR, build_tiny_text_encoder,
                                        hf_to_official_key)
    from renderer.vae.loading import build_vae

    write_tiny_official(root, preset)
    text = build_tiny_text_encoder(seed=0, d_model=preset.dit.text_dim)
    sd = {hf_to_official_key(k): v for k, v in text.model.state_dict().items() if hf_to_official_key(k)}
    torch.save(sd, root / OFFICIAL_T5_FILE)
    text.tokenizer.save_pretrained(str(root / OFFICIAL_TOKENIZER_DIR))
    vae = build_vae(preset.vae.version, tiny=True)
    torch.save(vae.state_dict(), root / f"Wan{preset.vae.version}_VAE.pth")


def test_a_complete_checkpoint_folder_passes_and_renders(tmp_path, capsys):
    """The negative control: the checks do not refuse a folder the loaders accept."""
    from renderer.preflight import check_checkpoint

    root = tmp_path / "ckpt"
    write_complete_tiny_official(root, T2V)
    assert check_checkpoint(T2V, root) == []
    assert main(["generate", "prompt=a kite", f"model.checkpoint={root}", "frames=5", "steps=2",
                 f"out={tmp_path / 'o'}", "render.device=cpu"]) == 0
    side = json.loads((tmp_path / "o" / "shot.json").read_text())
    assert side["checkpoint"] == str(root) and side["frames"] == 5
