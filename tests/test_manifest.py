"""Manifest reading and validation, and the dry run: every problem at once, never a traceback, nothing reserved."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from jobs.manifest import ManifestError, Problem, parse_csv, read_manifest, safe_name, validate_manifest
from jobs.plan import build_plan
from renderer.presets import load_preset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
T2V = load_preset("tiny_t2v")


def good_shot(i: int, **over) -> dict:
    return {"id": f"sh{i:03d}", "prompt": f"shot {i}, a lighthouse in the rain", "seed": i, **over}


def problems_of(raw: dict, **kw) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        validate_manifest(raw, T2V, **kw)
    return info.value.problems


def test_example_yaml_and_csv_are_the_same_shots():
    y = validate_manifest(read_manifest(EXAMPLES / "previs.yaml"), T2V, base_dir=EXAMPLES)
    c = validate_manifest(read_manifest(EXAMPLES / "previs.csv"), T2V, base_dir=EXAMPLES)
    assert [s.id for s in y.shots] == [s.id for s in c.shots]
    assert len(y.shots) == 6
    for a, b in zip(y.shots, c.shots):
        assert a.spec.resolve(T2V) == b.spec.resolve(T2V), a.id
        assert (a.priority, a.output) == (b.priority, b.output)
        assert (a.label, a.prompt_fields) == (b.label, b.prompt_fields) and a.label is True
        assert {k: str(v) for k, v in a.tags.items()} == b.tags
    plan_y = build_plan(y, T2V, "/nonexistent-out")
    plan_c = build_plan(c, T2V, "/nonexistent-out")
    assert [s.render_hash for s in plan_y.shots] == [s.render_hash for s in plan_c.shots]
    assert plan_y.shots[0].id == "sh040"  # urgent first, then high, then manifest order, low last
    assert plan_y.shots[-1].id == "sh060" and plan_y.shots[-1].mp4.name == "sh060_aerial_pullback.mp4"


def test_defaults_precedence_cli_over_shot_over_manifest():
    raw = {"defaults": {"steps": 5, "seed": 3, "tags": {"seq": "010"}},
           "shots": [good_shot(1, steps=7, tags={"cam": "wide"}), {"id": "b", "prompt": "x"}]}
    m = validate_manifest(raw, T2V, config_defaults={"steps": 2, "size": "80*48", "seed": None})
    a, b = m.shots
    assert a.spec.steps == 2 and b.spec.steps == 2  # command line > shot > manifest defaults (issue 15)
    assert m.overrides == ["command line job.shot_defaults.steps=2 overrides the manifest: defaults.steps 5; "
                           "steps on shot sh001 (7)"]
    assert b.spec.seed == 3 and b.spec.size == "80*48"
    assert a.tags == {"seq": "010", "cam": "wide"}


def test_every_problem_reported_at_once(tmp_path):
    raw = {"defalts": {}, "shots": [
        good_shot(1, promt="typo"),
        good_shot(1),  # duplicate id
        {"id": "sh 010/../x", "prompt": "unsafe id"},
        good_shot(4, size="65*48", frames=10),
        good_shot(5, task="i2v"),
        good_shot(6, image="missing.png"),
        good_shot(7, seed="seven", guidance="high", sampler="unipcc", tags=5, priority="asap"),
        "not a mapping",
        {"prompt": "no id"},
        good_shot(10, id="report"),
        good_shot(11, id=8),  # YAML's reading of a bare 010
    ]}
    got = {(p.shot, p.field) for p in problems_of(raw, base_dir=tmp_path)}
    expected = {("manifest", "defalts"), ("sh001", "promt"), ("sh001", "id"), ("#3", "id"), ("sh004", "size"),
                ("sh004", "frames"), ("sh005", "task"), ("sh006", "image"), ("sh007", "seed"), ("sh007", "guidance"),
                ("sh007", "sampler"), ("sh007", "tags"), ("sh007", "priority"), ("#8", "shot"), ("#9", "id"),
                ("#10", "id"), ("#11", "id")}
    assert expected <= got, expected - got
    text = str(ManifestError(problems_of(raw, base_dir=tmp_path)))
    assert "did you mean 'prompt'" in text and "did you mean 'defaults'" in text
    assert "'sh_010_.._x'" in text  # the fix for an unsafe id is a safe one
    assert "4n+1" in text and "tiny_t2v cannot do 'i2v'" in text and "was read as a number" in text


def test_yaml_dates_in_tags_become_text(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("shots:\n  - {id: a, prompt: x, tags: {due: 2026-01-05, take: 3}}\n")
    m = validate_manifest(read_manifest(path), T2V)
    assert m.shots[0].tags == {"due": "2026-01-05", "take": 3}
    json.dumps(m.shots[0].tags)


def test_csv_parsing_types_tags_and_comments():
    text = ("id,prompt,frames,guidance,tags,tags.lens,priority\n"
            "a,hello,9,3.0;4.0,scene=1; cam=wide,35mm,high\n"
            "# b,comment row,,,,,\n"
            ",,,,,,\n"
            "c,\"quoted, prompt\",nine,,x;y,,\n")
    raw = parse_csv(text)
    assert [s["id"] for s in raw["shots"]] == ["a", "c"]
    a, c = raw["shots"]
    assert a["frames"] == 9 and a["guidance"] == [3.0, 4.0] and a["tags"] == {"scene": "1", "cam": "wide",
                                                                               "lens": "35mm"}
    assert c["frames"] == "nine" and c["tags"] == ["x", "y"]
    probs = problems_of(raw)
    assert [(p.shot, p.field) for p in probs] == [("c", "frames")]


def test_unreadable_files_are_problems_not_tracebacks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shots:\n  - id: a\n    prompt: [unclosed\n")
    for path in (bad, tmp_path / "missing.yaml", tmp_path / "x.txt"):
        (tmp_path / "x.txt").write_text("hi")
        with pytest.raises(ManifestError) as info:
            read_manifest(path)
        assert info.value.problems and info.value.problems[0].shot == "manifest"
    assert "line" in str(pytest.raises(ManifestError, read_manifest, bad).value)


def test_safe_name():
    assert safe_name("sh 010/a") == "sh_010_a" and safe_name("../..") == "shot" and safe_name("CON") == "CON_shot"


def _compose(overrides):
    from renderer.conf import compose

    return compose(overrides)


def test_dry_run_prints_plan_and_reserves_nothing(tmp_path, capsys):
    from jobs.farm import run_job

    assert not ray.is_initialized()
    rc = run_job(_compose([f"manifest={EXAMPLES / 'previs.yaml'}", f"out={tmp_path / 'out'}", "dry_run=true"]))
    out = capsys.readouterr().out
    assert rc == 0 and "dry run" in out and "sh040" in out and "estimated" in out
    assert out.index("sh040") < out.index("sh010") < out.index("sh060")
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


# -- property: any mix of faults is reported completely, without a traceback, with nothing reserved -------------------
FAULTS = {
    "typo": (lambda s: {**s, "negativ_prompt": "blurry"}, "negativ_prompt"),
    "size": (lambda s: {**s, "size": "65*48"}, "size"),
    "frames": (lambda s: {**s, "frames": 10}, "frames"),
    "frames_type": (lambda s: {**s, "frames": "nine"}, "frames"),
    "task": (lambda s: {**s, "task": "i2v"}, "task"),
    "image": (lambda s: {**s, "image": "no/such/image.png"}, "image"),
    "seed": (lambda s: {**s, "seed": -2}, "seed"),  # -1 asks for a random seed
    "guidance": (lambda s: {**s, "guidance": [1, 2, 3]}, "guidance"),
    "sampler": (lambda s: {**s, "sampler": "ddim"}, "sampler"),
    "tags": (lambda s: {**s, "tags": 3.5}, "tags"),
    "priority": (lambda s: {**s, "priority": "asap"}, "priority"),
    "steps": (lambda s: {**s, "steps": 0}, "steps"),
    "empty_prompt": (lambda s: {**s, "prompt": "  "}, "prompt"),
    "prompt_type": (lambda s: {**s, "prompt": 42}, "prompt"),
}


@st.composite
def faulty_manifests(draw):
    n = draw(st.integers(1, 5))
    shots, expected = [], set()
    ids = [f"s{i}" for i in range(n)]
    for i in range(n):
        shot = good_shot(i, id=ids[i])
        for name in draw(st.lists(st.sampled_from(sorted(FAULTS)), max_size=3, unique=True)):
            fn, fld = FAULTS[name]
            shot = fn(shot)
            expected.add((ids[i], fld))
        shots.append(shot)
    if n > 1 and draw(st.booleans()):  # a duplicate id
        shots.append(good_shot(99, id=ids[0]))
        expected.add((ids[0], "id"))
    if draw(st.booleans()):  # an unsafe id
        shots.append(good_shot(98, id=draw(st.sampled_from(["a b", "../x", "-x", "é", "x/y", "logs"]))))
        expected.add((f"#{len(shots)}", "id"))
    raw = {"shots": shots}
    if draw(st.booleans()):
        raw["shotz"] = []
        expected.add(("manifest", "shotz"))
    return raw, expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=faulty_manifests())
def test_property_bad_manifests_list_every_problem(case, tmp_path):
    raw, expected = case
    if not expected:
        validate_manifest(raw, T2V, base_dir=tmp_path)
        return
    got = {(p.shot, p.field) for p in problems_of(raw, base_dir=tmp_path)}
    assert expected <= got, f"missing {expected - got}"
    assert not ray.is_initialized()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**20) | st.floats(allow_nan=True)
                           | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=4), max_leaves=12)
shot_like = st.dictionaries(st.sampled_from(["id", "prompt", "size", "frames", "steps", "seed", "guidance", "tags",
                                             "priority", "output", "image", "sampler", "task", "shift", "x"]),
                            json_values, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.dictionaries(st.sampled_from(["shots", "defaults", "name", "zz"]),
                                     st.one_of(json_values, st.lists(shot_like, max_size=4), shot_like), max_size=3),
                     st.fixed_dictionaries({"shots": st.lists(shot_like, min_size=1, max_size=4)})))
def test_property_arbitrary_input_never_tracebacks(raw, tmp_path):
    try:
        validate_manifest(raw, T2V, base_dir=tmp_path)
    except ManifestError as e:
        assert e.problems and all(isinstance(p, Problem) and p.message for p in e.problems)
    assert not ray.is_initialized()


def test_cli_dry_run_on_bad_manifest_exits_2_without_traceback(tmp_path, capsys):
    from jobs.farm import run_job

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"shots": [good_shot(1, frames=10, sede=1), good_shot(1)]}))
    rc = run_job(_compose([f"manifest={path}", f"out={tmp_path / 'out'}", "dry_run=true"]))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "shot sh001: frames" in err and "shot sh001: sede" in err and "shot sh001: id: duplicate" in err
    assert "nothing was rendered" in err and not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_config_problems_are_reported_with_the_manifest_ones(tmp_path, capsys):
    from jobs.farm import run_job

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny_t2v", "shots": [good_shot(1, frames=10)]}))
    rc = run_job(_compose([f"manifest={path}", f"out={tmp_path}", "job.max_retries=-1", "dry_run=true"]))
    err = capsys.readouterr().err
    assert rc == 2 and "job.max_retries" in err and "frames" in err
    path.write_text(yaml.safe_dump({"model": "tiny_t2v", "shots": [good_shot(1)]}))
    rc = run_job(_compose([f"manifest={path}", "model=t2v_a14b", f"out={tmp_path}", "dry_run=true"]))
    # command line > manifest (issue 15): model=t2v_a14b wins over the manifest's tiny_t2v, and asks for its weights
    assert rc == 2 and "model t2v_a14b needs its weights" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"model": "tiny_t2x", "shots": [good_shot(1)]}))
    assert run_job(_compose([f"manifest={path}", "dry_run=true"])) == 2
    assert "tiny_t2v" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dry_cfg(tmp_path_factory):
    return _compose([f"out={tmp_path_factory.mktemp('never')}/out", "dry_run=true"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=faulty_manifests())
def test_property_dry_run_of_bad_manifest_reports_all_and_reserves_nothing(case, dry_cfg, tmp_path, capsys):
    from jobs.farm import run_job

    raw, expected = case
    path = tmp_path / "m.json"
    path.write_text(json.dumps(raw))
    dry_cfg.manifest = str(path)
    rc = run_job(dry_cfg)
    err = capsys.readouterr().err
    assert "Traceback" not in err and not ray.is_initialized()
    assert not Path(dry_cfg.out).exists()
    if expected:
        assert rc == 2
        for shot, fld in expected:
            assert (f"manifest: {fld}:" if shot == "manifest" else f"shot {shot}: {fld}:") in err


def test_csv_defaults_come_from_the_command_line(tmp_path, capsys):
    from jobs.farm import run_job

    path = tmp_path / "shots.csv"
    path.write_text("id,prompt,seed\nx1,first,1\nx2,second,2\n")
    rc = run_job(_compose([f"manifest={path}", f"out={tmp_path / 'out'}", "dry_run=true", "job.shot_defaults.steps=3",
                           "job.shot_defaults.size=80*48", "job.shot_defaults.priority=high"]))
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[-1].endswith(".mp4")]
    assert [(r[1], r[2], r[4], r[6]) for r in rows] == [("x1", "10", "80*48", "3"), ("x2", "10", "80*48", "3")]
