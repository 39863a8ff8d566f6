"""`wanrender generate model=tiny_animate quality=draft quality.lora_dir=DIR ...` on CPU: the Wan2.1-I2V 4-step LoRA
(a tiny file in the real key format) merged, 4 Euler steps on the distilled schedule, guidance 1, written as
<name>.draft.mp4 beside (never over) the exact render; a missing LoRA file or an unsupported tier is exit 2 with the
shot, the field and the fix, before any model loads."""
import json

import torch

from renderer.families.animate.generate import animate_tier
from renderer.video_io import read_video
from tests.test_animate_cli import FRAMES, H, W, _inputs, _run
from tests.test_animate_draft_lora import write_i2v_lora

LORA = "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"


def _tiny_lora(folder):
    from renderer.families.animate.model import build_animate
    from renderer.presets import load_preset

    folder.mkdir()
    model = build_animate(load_preset("tiny_animate").dit, dtype=torch.float32, seed=0)
    write_i2v_lora(folder / LORA, model, rank=4, alpha=4.0, seed=1)
    return folder


def test_draft_render_end_to_end(tmp_path):
    loras = _tiny_lora(tmp_path / "loras")
    out = tmp_path / "out"
    common = _inputs(tmp_path, "animate") + [f"out={out}", "name=take1", "seed=3", "render.progress=false"]
    r = _run(common + ["quality=draft", f"quality.lora_dir={loras}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "take1.draft.mp4").is_file() and not (out / "take1.mp4").exists()
    video = read_video(out / "take1.draft.mp4")
    assert video.shape == (FRAMES, H, W, 3)
    side = json.loads((out / "take1.draft.json").read_text())
    assert side["final"] is False and side["quality"]["name"] == "draft"
    assert (side["steps"], side["sampler"], side["shift"], side["guidance"]) == (4, "euler_lightning", 5.0, 1.0)
    assert side["quality"]["loras"] == [{"file": LORA, "scale": 1.0, "expert": "all", "path": str(loras / LORA)}]
    assert "families" not in side["quality"]

    # the exact render of the same shot: its own file, the draft kept; the LoRA changed the pixels
    r = _run(common + ["steps=4", "sampler=euler_lightning"])
    assert r.returncode == 0, r.stderr[-3000:]
    exact = read_video(out / "take1.mp4")
    assert (out / "take1.draft.mp4").is_file()
    assert json.loads((out / "take1.json").read_text())["final"] is True
    assert abs(exact.astype(float) - video.astype(float)).mean() > 0.5  # same seed and schedule, + the LoRA


def test_draft_problems_exit_2_before_loading(tmp_path):
    args = _inputs(tmp_path, "animate") + [f"out={tmp_path / 'out'}", "name=take1"]
    (tmp_path / "empty").mkdir()
    r = _run(args + ["quality=draft", f"quality.lora_dir={tmp_path / 'empty'}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: shot take1: quality.lora_dir: tier draft: LoRA file(s) not found: {tmp_path / 'empty' / LORA}" \
        in r.stderr
    r = _run(args + ["quality=fast"])
    assert r.returncode == 2 and "error: shot take1: quality: fast is not available for Animate shots" in r.stderr
    assert not (tmp_path / "out").exists()


def test_tier_for_animate_on_real_weights_needs_the_lora_dir():
    tier, files, problems = animate_tier({"name": "draft", "steps": 4, "sampler": "euler_lightning", "shift": 5.0,
                                          "guidance": 1.0, "families": {"animate": {"loras": [LORA]}}},
                                         random_weights=False)
    assert files == [] and problems[0][0] == "quality.lora_dir"
    assert "quality.lora_dir=/ckpt/Kijai/WanVideo_comfy/Lightx2v" in problems[0][1]
    tier, files, problems = animate_tier(None, random_weights=False)
    assert tier.name == "exact" and files == [] and problems == []
