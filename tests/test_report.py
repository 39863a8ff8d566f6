"""report.json / report.html from a finished job (no Ray: shots and records are built directly), checked in headless
Chromium: no console errors, every thumbnail decoded."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.manifest import validate_manifest
from jobs.plan import build_plan
from jobs.report import write_report
from jobs.scheduler import ShotRecord
from renderer.presets import load_preset
from renderer.video_io import write_json_atomic, write_mp4

CHROMIUM = "/usr/bin/chromium"
T2V = load_preset("tiny_t2v")


def chromium(url: str, profile: Path) -> tuple[str, str]:
    """(DOM after load, browser stderr) from a headless Chromium with no network features."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return p.stdout, p.stderr


def console_errors(stderr: str) -> list[str]:
    # console.* messages and uncaught exceptions are logged as "...:CONSOLE:<line>] "<text>", source: ..."
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture
def finished_job(tmp_path):
    """A job folder: a done shot, a portrait shot done by an earlier run, a failed shot with its log."""
    raw = {"name": "report <test> & co", "shots": [
        {"id": "a", "prompt": "wide <b>shot</b> & \"quotes\"", "seed": 1, "tags": {"cam": "wide"}},
        {"id": "b", "prompt": "portrait", "seed": 2, "size": "48*64", "priority": 5},
        {"id": "c", "prompt": "this one fails", "seed": 3, "tags": ["hero"]}]}
    manifest = validate_manifest(raw, T2V)
    out = tmp_path / "out"
    plan = build_plan(manifest, T2V, out)
    rng = np.random.default_rng(0)
    for p in plan.shots[:2]:  # real MP4s + sidecars, as write_shot leaves them
        w, h = (int(v) for v in p.spec.size.split("*"))
        write_mp4(rng.integers(0, 255, (p.spec.frames, h, w, 3), dtype=np.uint8), p.mp4, fps=16)
        write_json_atomic(p.mp4.with_suffix(".json"), {"render_hash": p.render_hash, "timings_s": {"denoise": 0.5}})
    plan = build_plan(manifest, T2V, out)
    by_id = {p.id: p for p in plan.shots}
    assert by_id["a"].done and by_id["b"].done and not by_id["c"].done
    now = time.time()
    log = out / "logs" / "c.attempt2.log"
    log.parent.mkdir(parents=True)
    log.write_text("boom\n")
    records = {
        "b": ShotRecord(by_id["b"], "skipped"),
        "a": ShotRecord(by_id["a"], "done", attempts=[{"attempt": 1, "group": "g0", "node_id": "n1",
                                                       "started_at": now, "ended_at": now + 1, "seconds": 1.0,
                                                       "status": "done", "log": str(out / "logs/a.attempt1.log")}],
                        result={"seconds": 1.0, "timings": {"denoise": 0.7, "vae_decode": 0.1}}),
        "c": ShotRecord(by_id["c"], "failed", error="RuntimeError: CUDA out of memory <here>", attempts=[
            {"attempt": i, "group": f"g{i}", "status": "failed", "started_at": now, "seconds": 2.0,
             "error": "RuntimeError: CUDA out of memory", "log": str(out / f"logs/c.attempt{i}.log")}
            for i in (1, 2)]),
    }
    job = {"name": manifest.name, "model": T2V.name, "fingerprint": plan.fingerprint, "manifest": "m.yaml",
           "gpus_per_group": 1, "dashboard": "http://127.0.0.1:8265", "events": ["12:00:00 a: done <ok>"]}
    json_path, html_path = write_report(out, job, records, 12.5)
    return out, json_path, html_path


def test_report_json(finished_job):
    out, json_path, _ = finished_job
    rep = json.loads(json_path.read_text())
    assert rep["counts"] == {"skipped": 1, "done": 1, "failed": 1} and rep["ok"] is False
    shots = {s["id"]: s for s in rep["shots"]}
    assert shots["a"]["mp4"] == "a.mp4" and shots["a"]["timings_s"]["denoise"] == 0.7
    assert shots["c"]["error"].startswith("RuntimeError") and shots["c"]["log"] == "logs/c.attempt2.log"
    assert shots["c"]["attempt_count"] == 2 and shots["c"]["mp4"] is None
    assert shots["b"]["seed"] == 2 and shots["b"]["prompt"] == "portrait"


def test_report_html_is_self_contained(finished_job):
    _, _, html_path = finished_job
    html = html_path.read_text()
    assert html.count('class="thumb"') == 6  # first, middle, last of the two rendered shots
    images = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert len(images) == 6 and all(s.startswith("data:image/jpeg;base64,") for s in images)
    # the clips themselves play from relative links into the job folder (issue 15): the folder moves as a whole
    videos = re.findall(r'<video [^>]*src="([^"]*)"', html)
    assert sorted(videos) == ["a.mp4", "b.mp4"] and all((html_path.parent / v).is_file() for v in videos)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert "&lt;b&gt;shot&lt;/b&gt;" in html and "<b>shot</b>" not in html  # prompts are escaped
    assert "CUDA out of memory &lt;here&gt;" in html and "logs/c.attempt2.log" in html


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                                        "(apt-get install -y chromium)")
def test_report_html_in_headless_chromium(finished_job, tmp_path):
    _, _, html_path = finished_job
    dom, stderr = chromium(html_path.as_uri(), tmp_path / "profile")
    body = re.search(r"<body[^>]*>", dom)
    assert body, f"no DOM dumped; chromium stderr:\n{stderr[-2000:]}"
    attrs = dict(re.findall(r'(data-thumbs-[a-z]+)="([^"]*)"', body.group(0)))
    assert attrs["data-thumbs-total"] == "6" and attrs["data-thumbs-ok"] == "6", attrs
    assert attrs["data-thumbs-broken"] == ""
    assert "6 of 6 thumbnails decoded" in dom
    assert console_errors(stderr) == [], console_errors(stderr)

    # the same check does catch a page with a script error or a broken image (so the test above means something)
    bad = tmp_path / "bad.html"
    bad.write_text(html_path.read_text().replace('src="data:image/jpeg;base64,', 'src="data:image/jpeg;base64,AAAA', 1)
                   .replace("</body>", "<script>notDefined();</script></body>"))
    dom, stderr = chromium(bad.as_uri(), tmp_path / "profile2")
    attrs = dict(re.findall(r'(data-thumbs-[a-z]+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group(0)))
    assert attrs["data-thumbs-ok"] == "5" and attrs["data-thumbs-broken"]
    assert any("notDefined" in line for line in console_errors(stderr))

