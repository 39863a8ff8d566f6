"""Signed provenance: a C2PA manifest in each MP4, signed with a certificate chain the test makes, verified back;
a modified file fails; the sidecar, MP4 tags, C2PA manifest and report carry the same record."""
import pytest

from renderer.cli import main
from renderer.media_provenance import DIGITAL_SOURCE_TYPE, make_test_chain, mp4_tags, verify_mp4
from renderer.prompts import prompt_hash
from renderer.video_io import read_json, read_mp4_metadata
from tests.safety_helpers import no_network  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_test_chain(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def signed(chain, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    rc = main(["generate", "model=tiny_t2v", "prompt={character: a keeper, action: climbs, scene: a tower}",
               "seed=11", "steps=2", "render.progress=false", "label=true", f"out={out}",
               "name=sh1", f"provenance.cert={chain['chain']}", f"provenance.key={chain['key']}"])
    assert rc == 0
    return out / "sh1.mp4"


def test_signature_and_content_hash_verify(signed, chain, capsys):
    v = verify_mp4(signed, trust=chain["root"])
    assert v.signed and v.signature_valid and v.content_hash_valid and v.trusted and v.ok and v.ai_generated
    assert main(["verify", str(signed), "--trust", str(chain["root"])]) == 0
    out = capsys.readouterr().out
    assert "signature:     valid" in out and "content hash:  valid" in out and "=> OK" in out
    # without a trust list the chain is not judged, but signature and hash still are
    assert verify_mp4(signed).trusted is None and verify_mp4(signed).ok


def test_a_modified_file_fails(signed, chain, tmp_path, capsys):
    data = bytearray(signed.read_bytes())
    i = data.find(b"mdat") + 64  # one bit of the coded video
    data[i] ^= 0x01
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    v = verify_mp4(bad, trust=chain["root"])
    assert v.signed and not v.content_hash_valid and not v.ok
    assert main(["verify", str(bad)]) == 1
    assert "content hash:  INVALID" in capsys.readouterr().out


def test_a_changed_provenance_record_or_signature_fails(signed, chain, tmp_path):
    data = signed.read_bytes()
    record_at = data.find(b"random-seed0")  # the checkpoint fingerprint inside the signed record assertion
    assert record_at > 0
    forged = bytearray(data)
    forged[record_at] = ord("R")
    (tmp_path / "forged.mp4").write_bytes(bytes(forged))
    v = verify_mp4(tmp_path / "forged.mp4", trust=chain["root"])
    assert not v.ok and any("mismatch" in f for f in v.failures)
    assert main(["verify", str(tmp_path / "forged.mp4")]) == 1
    sig_at = data.find(b"c2pa.signature")
    assert sig_at > 0
    broken = [bytearray(data) for _ in range(3)]
    for k, off in enumerate((200, 400, 600)):  # somewhere in the signature box: never a pass
        broken[k][sig_at + off] ^= 0xFF
        (tmp_path / f"sig{k}.mp4").write_bytes(bytes(broken[k]))
        assert not verify_mp4(tmp_path / f"sig{k}.mp4", trust=chain["root"]).ok


def test_unsigned_and_foreign_root_fail(signed, tmp_path, capsys):
    from renderer.video_io import write_mp4
    import numpy as np

    plain = write_mp4(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "plain.mp4", fps=8)
    assert main(["verify", str(plain)]) == 1 and "not signed" in capsys.readouterr().out
    other = make_test_chain(tmp_path / "other", organization="another studio")
    v = verify_mp4(signed, trust=other["root"])
    assert v.trusted is False and not v.ok
    assert main(["verify", str(tmp_path / "missing.mp4")]) == 2
    (tmp_path / "notpem.txt").write_text("hello")
    assert main(["verify", str(signed), "--trust", str(tmp_path / "notpem.txt")]) == 2
    assert "not a PEM certificate" in capsys.readouterr().err
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(signed.read_bytes()[:3000])
    assert main(["verify", str(truncated)]) == 1 and "cannot be checked" in capsys.readouterr().out


def test_one_record_everywhere(signed):
    from renderer.media_provenance import ASSERTION_LABEL  # noqa: F401  (the record's assertion in the manifest)

    side = read_json(signed.with_suffix(".json"))
    record = side["provenance"]
    assert side["c2pa_signed"] is True
    assert record["prompt_sha256"] == prompt_hash(side["prompt"]) and record["seed"] == 11
    assert record["tier"] == "exact" and record["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert record["checkpoint_fingerprint"] == side["checkpoint_fingerprint"] and record["visible_label"] == "AI生成草案"
    assert verify_mp4(signed).record == record  # the C2PA assertion
    tags = read_mp4_metadata(signed)
    assert {k: tags[k] for k in mp4_tags(record)} == mp4_tags(record)  # the container tags
    assert side["prompt_fields"] == {"character": "a keeper", "action": "climbs", "scene": "a tower"}
    screen = side["prompt_screen"]  # which term lists screened the prompt, by content hash
    assert screen["passed"] is True and set(screen["lists"]) >= {"en", "zh"} and len(screen["lists"]["zh"]["sha256"]) == 64


def test_report_carries_the_same_record(signed):
    from jobs.manifest import validate_manifest
    from jobs.plan import build_plan
    from jobs.report import write_report
    from jobs.scheduler import ShotRecord
    from renderer.presets import load_preset

    preset = load_preset("tiny_t2v")
    m = validate_manifest({"shots": [{"id": "sh1", "seed": 11, "steps": 2, "label": True, "prompt": {
        "character": "a keeper", "action": "climbs", "scene": "a tower"}}]}, preset)
    plan = build_plan(m, preset, signed.parent, gpus_per_group=1)
    assert plan.shots[0].done
    json_path, html_path = write_report(signed.parent, {"name": "t"}, {"sh1": ShotRecord(plan.shots[0], "skipped")}, 1)
    entry = read_json(json_path)["shots"][0]
    assert entry["provenance"] == read_json(signed.with_suffix(".json"))["provenance"]
    assert entry["prompt_fields"]["action"] == "climbs"
    page = html_path.read_text()
    assert entry["c2pa_check"]["ok"] is True and entry["c2pa_check"]["content_hash_valid"] is True
    assert "signature and content hash valid" in page and "人物 character" in page


def test_a_key_that_does_not_match_the_certificate_is_refused_before_rendering(chain, tmp_path, capsys):
    other = make_test_chain(tmp_path / "other")
    rc = main(["generate", "model=tiny_t2v", "prompt=a kite", f"out={tmp_path / 'o'}",
               f"provenance.cert={chain['chain']}", f"provenance.key={other['key']}"])
    err = capsys.readouterr().err
    assert rc == 2 and "provenance.cert" in err and "does not belong" in err and not (tmp_path / "o").exists()
    rc = main(["generate", "model=tiny_t2v", "prompt=a kite", f"out={tmp_path / 'o'}", "provenance.sign=true"])
    assert rc == 2 and "provenance.cert" in capsys.readouterr().err
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    rc = main(["generate", "model=tiny_t2v", "prompt=a kite", f"out={tmp_path / 'o'}", f"provenance.cert={junk}",
               f"provenance.key={chain['key']}"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a PEM certificate chain" in err and "Traceback" not in err


def test_signing_and_verifying_run_offline(chain, tmp_path, no_network):
    import numpy as np

    from renderer.media_provenance import SigningSettings, build_record, sign_mp4
    from renderer.video_io import write_mp4

    src = write_mp4(np.full((3, 32, 32, 3), 120, np.uint8), tmp_path / "src.mp4", fps=8)
    record = build_record(shot_id="x", preset_name="t2v_a14b", checkpoint_fingerprint="abc", prompt="p",
                          negative_prompt=None, seed=1, tier="exact", code_version="0")
    dest = sign_mp4(src, tmp_path / "signed.mp4", record, SigningSettings(cert=str(chain["chain"]),
                                                                             key=str(chain["key"])))
    v = verify_mp4(dest, trust=chain["root"])
    assert v.ok and v.record["model"] == "Wan2.2-T2V-A14B" and v.record["model_version"] == "2.2"
