"""Structured prompts: composition order, Chinese/English keys, project defaults, and validation messages."""
import pytest

from jobs.manifest import ManifestError, parse_csv, validate_manifest
from renderer.presets import load_preset
from renderer.prompts import PromptError, compose, resolve_prompt

TINY = load_preset("tiny_t2v")
BASE = {"size": "64*48", "frames": 9, "steps": 2}


def test_compose_follows_the_documented_order_whatever_the_key_order():
    fields = {"lighting": "dusk light", "camera": "wide shot", "action": "walks", "scene": "on a cliff",
              "character": "a keeper", "style": "film grain"}
    assert compose(fields) == "a keeper, walks, on a cliff, wide shot, film grain, dusk light"


def test_chinese_keys_and_chinese_separator():
    fields = {"镜头": "远景。", "人物": "灯塔看守人", "动作": "登上台阶", "环境": "暴风雨中的石塔"}
    assert compose(fields) == "灯塔看守人，登上台阶，暴风雨中的石塔，远景。"
    # English and Chinese keys mean the same field
    assert compose({"人物": "a", "action": "b", "环境": "c"}) == "a, b, c"


def test_missing_required_field_and_unknown_key_are_named():
    with pytest.raises(PromptError) as e:
        compose({"人物": "a keeper", "scene": "tower"})
    assert e.value.field == "action" and "动作" in str(e.value)
    with pytest.raises(PromptError) as e:
        compose({"character": "a", "action": "b", "scene": "c", "mood": "grim"})
    assert e.value.field == "mood" and "unknown prompt field" in str(e.value)
    with pytest.raises(PromptError, match="given twice"):
        compose({"character": "a", "人物": "b", "action": "b", "scene": "c"})


def test_project_defaults_are_overridden_field_by_field():
    text, fields = resolve_prompt({"character": "a", "action": "b", "scene": "c", "风格": "noir"},
                                  {"style": "pastel", "lighting": "dawn"})
    assert fields == {"character": "a", "action": "b", "scene": "c", "style": "noir", "lighting": "dawn"}
    assert text == "a, b, c, noir, dawn"
    # plain text is used as written, defaults or not
    assert resolve_prompt("a kite over a beach", {"style": "noir"}) == ("a kite over a beach", None)


def test_manifest_composes_keeps_fields_and_names_the_shot_and_field():
    raw = {"defaults": {**BASE, "prompt": {"style": "pastel", "光线": "dawn"}},
           "shots": [{"id": "sh010", "prompt": {"人物": "a keeper", "动作": "walks", "环境": "a cliff"}},
                     {"id": "sh020", "prompt": "free text stays"},
                     {"id": "sh030", "prompt": {"character": "x", "action": "y", "scene": "z", "style": "noir"}}]}
    m = validate_manifest(raw, TINY)
    s = {r.id: r for r in m.shots}
    assert s["sh010"].spec.prompt == "a keeper, walks, a cliff, pastel, dawn"
    assert s["sh010"].prompt_fields["lighting"] == "dawn"
    assert s["sh020"].spec.prompt == "free text stays" and s["sh020"].prompt_fields is None
    assert s["sh030"].spec.prompt.endswith("noir, dawn")
    raw["shots"].append({"id": "sh040", "prompt": {"人物": "a keeper", "环境": "a cliff"}})
    with pytest.raises(ManifestError) as e:
        validate_manifest(raw, TINY)
    assert [(p.shot, p.field) for p in e.value.problems] == [("sh040", "prompt.action")]
    assert "add `action:`" in str(e.value) and "empty" not in str(e.value)


def test_csv_prompt_columns_build_a_structured_prompt():
    text = "id,prompt.人物,prompt.动作,prompt.环境,prompt.镜头,seed\nsh1,keeper,climbs,tower,close-up,3\n"
    m = validate_manifest({**parse_csv(text), "defaults": BASE}, TINY)
    assert m.shots[0].spec.prompt == "keeper, climbs, tower, close-up"
    assert m.shots[0].prompt_fields["camera"] == "close-up"


def test_generate_refuses_a_structured_prompt_without_a_required_field(tmp_path, capsys):
    from renderer.cli import main

    rc = main(["generate", "model=tiny_t2v", "prompt={character: a keeper, scene: a tower}", f"out={tmp_path}",
               "name=k"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "shot k" in err and "prompt.action" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
