"""Content-safety gate: prompt term lists (before any model loads), the real NudeNet detector on benign frames, and
hold / release of a shot through a test detector that flags."""
import json

import numpy as np
import pytest

from renderer.cli import main
from renderer.safety import OutputScreen, SafetySettings, load_terms, sample_indices, screen_prompt
from renderer.video_io import read_json
from tests.safety_helpers import no_network  # noqa: F401  (fixture)


def terms(tmp_path, en="nude\nrape\nexplicit sex\n", zh="裸体\n血腥\n"):
    (tmp_path / "terms_en.txt").write_text("# comment\n" + en, encoding="utf-8")
    (tmp_path / "terms_zh.txt").write_text(zh, encoding="utf-8")
    return load_terms(tmp_path)


def test_english_matches_whole_words_chinese_substrings(tmp_path):
    lists = terms(tmp_path)
    found = lambda text: sorted(m.term for m in screen_prompt(text, lists))  # noqa: E731
    assert found("A NUDE figure by the sea") == ["nude"]
    assert found("two nudes") == ["nude"]  # reported as the list has it
    assert found("grapes on a table, a denuded hillside, Sussex") == []  # no substring hits in English
    assert found("an explicit   sex scene") == ["explicit sex"]
    assert found("一个裸体的人") == ["裸体"] and found("血腥的战场") == ["血腥"]
    m = screen_prompt("nude", lists)[0]
    assert m.language == "en" and "terms_en.txt" in m.message() and "rephrase" in m.message()


def test_shipped_lists_load_and_screen():
    lists = load_terms()
    assert {tl.language for tl in lists} >= {"en", "zh"}
    assert screen_prompt("a lighthouse keeper climbs the stairs", lists) == []
    assert [m.term for m in screen_prompt("斩首的场景", lists)] == ["斩首"]


def test_generate_refuses_a_blocked_prompt_before_loading_anything(tmp_path, capsys, monkeypatch):
    import renderer.pipeline

    def boom(*a, **k):
        raise AssertionError("the pipeline must not be built for a blocked prompt")

    monkeypatch.setattr(renderer.pipeline.Pipeline, "__init__", boom)
    rc = main(["generate", "model=tiny_t2v", "prompt=a nude swimmer at dawn", f"out={tmp_path / 'out'}", "name=k"])
    err = capsys.readouterr().err
    assert rc == 2 and "shot k: prompt:" in err and "'nude'" in err and "terms_en.txt" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    rc = main(["generate", "model=tiny_t2v", "prompt={character: '士兵', action: '斩首', scene: '战场'}", f"out={tmp_path}", "name=z"])
    assert rc == 2 and "'斩首'" in capsys.readouterr().err


def test_farm_refuses_a_blocked_prompt_naming_the_shot(tmp_path):
    from jobs.farm import prepare
    from jobs.manifest import ManifestError
    from renderer.conf import compose

    (tmp_path / "m.yaml").write_text(json.dumps({"defaults": {"size": "64*48", "frames": 9, "steps": 2},
                                                 "shots": [{"id": "ok1", "prompt": "a kite"},
                                                           {"id": "bad1", "prompt": "gory battlefield"}]}))
    cfg = compose([f"manifest={tmp_path / 'm.yaml'}", f"out={tmp_path / 'out'}"])
    with pytest.raises(ManifestError) as e:
        prepare(cfg)
    assert [(p.shot, p.field) for p in e.value.problems] == [("bad1", "prompt")] and "'gory'" in str(e.value)


def test_nudenet_loads_offline_and_finds_nothing_on_benign_frames(no_network):
    screen = OutputScreen.from_settings(SafetySettings())
    assert screen.detector.name == "nudenet-320n"
    rng = np.random.default_rng(0)
    frames = np.empty((9, 96, 128, 3), np.uint8)
    frames[:] = np.linspace(0, 255, 128, dtype=np.uint8)[None, None, :, None]  # a grey ramp
    frames[4:] = rng.integers(0, 255, (5, 96, 128, 3), dtype=np.uint8)  # noise
    raw = screen.detector(frames[0])  # the real ONNX model runs
    assert isinstance(raw, list)
    verdict = screen.check(frames)
    assert verdict["held"] is False and verdict["frames_checked"] == sample_indices(9, 4) == [0, 3, 5, 8]
    assert verdict["detector"] == "nudenet-320n" and verdict["detection"] is None


def test_threshold_decides():
    from tests.safety_helpers import flag_weakly

    frames = np.zeros((5, 16, 16, 3), np.uint8)
    assert OutputScreen(SafetySettings(), flag_weakly()).check(frames)["held"] is False
    v = OutputScreen(SafetySettings(threshold=0.2), flag_weakly()).check(frames)
    assert v["held"] is True and v["score"] == 0.3 and "BUTTOCKS_EXPOSED" in v["reason"]


GEN = ["generate", "model=tiny_t2v", "prompt=a red kite over a beach", "steps=2", "seed=3", "render.progress=false",
       "safety.detector=tests.safety_helpers:flag_everything"]


def test_flagged_shot_is_held_in_quarantine_and_released_by_a_person(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(GEN + [f"out={out}", "name=kite"]) == 1  # rendered but not delivered
    assert "HELD" in capsys.readouterr().out
    assert not (out / "kite.mp4").exists() and not (out / "kite.json").exists()
    q = read_json(out / "quarantine" / "kite.json")
    assert q["safety"]["held"] and q["safety"]["score"] == 0.93
    assert "FEMALE_BREAST_EXPOSED" in q["safety"]["reason"] and q["safety"]["detector"] == "test-flag-everything"
    held_bytes = (out / "quarantine" / "kite.mp4").read_bytes()

    assert main(["release", str(out), "kite", "--by", "Mei Chen"]) == 2  # --reason is required
    assert main(["release", str(out), "nothere", "--by", "x", "--reason", "y"]) == 2
    assert "not held" in capsys.readouterr().err
    assert main(["release", str(out), "../kite", "--by", "x", "--reason", "y"]) == 2
    assert "without folder" in capsys.readouterr().err
    assert main(["release", str(out), "kite", "--by", "Mei Chen", "--reason", "false positive: a kite"]) == 0
    assert (out / "kite.mp4").read_bytes() == held_bytes  # the very file, moved
    side = read_json(out / "kite.json")
    assert side["release"]["released_by"] == "Mei Chen" and side["release"]["reason"] == "false positive: a kite"
    assert side["release"]["released_at"].endswith("Z") and side["release"]["safety"]["score"] == 0.93
    assert not (out / "quarantine" / "kite.mp4").exists() and not (out / "quarantine" / "kite.json").exists()
    log = [json.loads(x) for x in (out / "quarantine" / "releases.jsonl").read_text().splitlines()]
    assert [r["released_by"] for r in log] == ["Mei Chen"]
    # a second render held under the same name never overwrites the delivered file on release
    assert main(GEN + [f"out={out}", "name=kite", "seed=4"]) == 1
    assert main(["release", str(out), "kite", "--by", "x", "--reason", "y"]) == 2
    assert (out / "kite.mp4").read_bytes() == held_bytes


def test_held_shot_is_not_rendered_again_and_the_report_says_held(tmp_path):
    from jobs.manifest import validate_manifest
    from jobs.plan import build_plan
    from jobs.report import write_report
    from jobs.scheduler import ShotRecord
    from renderer.presets import load_preset

    out = tmp_path / "out"
    assert main(GEN + [f"out={out}", "name=sh1"]) == 1
    preset = load_preset("tiny_t2v")
    m = validate_manifest({"shots": [{"id": "sh1", "prompt": "a red kite over a beach", "steps": 2, "seed": 3}]},
                          preset)
    plan = build_plan(m, preset, out, gpus_per_group=1)
    assert plan.shots[0].done and plan.shots[0].reason == "held in quarantine"
    json_path, html_path = write_report(out, {"name": "t"}, {"sh1": ShotRecord(plan.shots[0], "skipped")}, 1.0)
    entry = read_json(json_path)["shots"][0]
    assert entry["status"] == "held" and entry["mp4"] is None and entry["safety"]["score"] == 0.93
    page = html_path.read_text()
    assert "HELD by the content-safety gate" in page and 'class="thumb"' not in page  # flagged frames not shown
    assert main(["release", str(out), "sh1", "--by", "QA", "--reason", "reviewed"]) == 0
    entry = read_json(json_path)["shots"][0]
    assert entry["status"] == "released" and entry["release"]["released_by"] == "QA"
    assert read_json(json_path)["ok"] is True and read_json(json_path)["counts"] == {"released": 1}
    assert "released by <b>QA</b>" in html_path.read_text()


def test_bad_safety_settings_are_refused_before_loading(tmp_path, capsys):
    rc = main(["generate", "model=tiny_t2v", "prompt=a kite", f"out={tmp_path / 'o'}", "safety.threshold=1.5",
               "safety.sample_frames=0", "safety.detector=no_such_module:make", f"safety.terms_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "o").exists()
    for field in ("safety.threshold", "safety.sample_frames", "safety.detector", "safety.terms_dir"):
        assert f"shot shot: {field}:" in err, field


def test_a_flagged_input_image_is_refused_before_any_model_loads(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(img)
    args = ["generate", "model=tiny_i2v", "prompt=a kite", f"image={img}", f"out={tmp_path / 'o'}", "name=k"]
    rc = main(args + ["safety.detector=tests.safety_helpers:flag_everything"])
    err = capsys.readouterr().err
    assert rc == 2 and "shot k: image:" in err and "FEMALE_BREAST_EXPOSED" in err and not (tmp_path / "o").exists()
    assert main(args + ["safety.detector=tests.safety_helpers:flag_weakly", "steps=1", "render.progress=false"]) == 0
