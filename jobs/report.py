"""The job's final report: <out>/report.json (machine-readable) and <out>/report.html (for people).

report.html is one self-contained file: inline CSS, thumbnails as base64 JPEG data URIs, no external fonts, scripts
or images, so it opens offline and can be mailed around. Its contact sheet shows the first, middle and last frame
of every shot with status, attempts, seed, prompt and negative prompt, timings, the MP4 itself (a <video> with a
relative link, so the folder can be moved or served as a whole) and, for a failed shot, the failure class
(jobs/faults.py), the error and its log. The Ray dashboard is linked only in the report written while the job
runs (job["running"]): the final report outlives the dashboard. A tiny
inline script checks that every thumbnail decoded and records the result on <body data-thumbs-ok=...> (the test
reads it back from headless Chromium).
"""
from __future__ import annotations

import base64
import html
import io
import os
import time
from pathlib import Path
from typing import Any

from jobs.animate_shots import contact_images
from jobs.plan import format_duration
from jobs.report_safety import c2pa_check

THUMB_WIDTH = 192


def thumbnails(mp4: Path) -> list[str]:
    """First, middle and last frame as JPEG data URIs; [] when the video cannot be read."""
    from PIL import Image

    from renderer.video_io import video_info, extract_frames

    try:
        info = video_info(mp4)
        n = info["frames"]
    except Exception:  # a missing or unreadable MP4 gets placeholders, never a broken report
        return []
    try:
        frames = extract_frames(mp4, [0, n // 2, n - 1])
    except Exception:  # decord's batch decode fails on some portrait sizes (48*64): ask ffmpeg instead
        frames = _ffmpeg_frames(mp4, [0, n // 2, n - 1], info["width"], info["height"])
    uris = []
    for f in frames:
        im = Image.fromarray(f)
        if im.width < THUMB_WIDTH:  # tiny renders: scale up with hard edges so the pixels stay honest
            scale = max(1, THUMB_WIDTH // im.width)
            im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        elif im.width > THUMB_WIDTH:
            im = im.resize((THUMB_WIDTH, round(im.height * THUMB_WIDTH / im.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=85)
        uris.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return uris


def _image_uri(path: str) -> str | None:
    """A PNG (the Animate preprocessing preview) as a JPEG data URI, 480 px tall at most."""
    from PIL import Image

    try:
        im = Image.open(path).convert("RGB")
    except OSError:
        return None
    if im.height > 480:
        im = im.resize((round(im.width * 480 / im.height), 480), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _ffmpeg_frames(mp4: Path, indices: list[int], width: int, height: int) -> list:
    import subprocess

    import numpy as np

    from renderer.video_io import ffmpeg_exe

    select = "+".join(f"eq(n\\,{i})" for i in sorted(set(indices)))
    try:
        raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(mp4), "-vf", f"select={select}", "-fps_mode", "passthrough",
                              "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, timeout=120,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    size = width * height * 3
    got = [np.frombuffer(raw[i:i + size], np.uint8).reshape(height, width, 3) for i in range(0, len(raw) - size + 1,
                                                                                          size)]
    by_index = dict(zip(sorted(set(indices)), got))
    return [by_index[i] for i in indices if i in by_index]


def shot_entry(rec, out_dir: Path) -> dict[str, Any]:
    """One shot of the report (plain JSON types only)."""
    from renderer.video_io import read_json, sidecar_path

    p = rec.shot
    spec = p.spec
    timings, seconds, side, quality = {}, None, {}, "exact"
    status = rec.status
    if rec.status in ("done", "skipped"):
        from renderer.safety import held_sidecar

        try:
            side = read_json(sidecar_path(p.mp4)) if sidecar_path(p.mp4).is_file() else {}
        except (OSError, ValueError):
            side = {}
        if not p.mp4.is_file() and (held := held_sidecar(out_dir, p.output)) is not None:
            side, status = held, "held"  # the safety gate kept it in quarantine/: not delivered
        timings = side.get("timings_s", {}) if isinstance(side, dict) else {}
        quality = ((side.get("quality") if isinstance(side, dict) else None) or {}).get("name", "exact")
    if rec.result:
        seconds = rec.result.get("seconds")
        timings = {**timings, **(rec.result.get("timings") or {})}
    return {
        "id": p.id, "output": p.output, "status": status, "reason": p.reason,
        "prompt_fields": side.get("prompt_fields"), "provenance": side.get("provenance"),
        "c2pa_signed": side.get("c2pa_signed"), "safety": side.get("safety"), "release": side.get("release"),
        "c2pa_check": c2pa_check(p.mp4) if side.get("c2pa_signed") and p.mp4.is_file() else None,
        "priority": p.priority, "tags": p.request.tags, "task": spec.task, "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt, "seed": spec.seed, "size": spec.size, "frames": spec.frames,
        "steps": spec.steps, "sampler": spec.sampler, "guidance": list(spec.guidance), "render_hash": p.render_hash,
        "mp4": _link(p.mp4, out_dir) if p.mp4.is_file() else None,
        # Animate shots: the plate and the preprocessing preview (keypoints + mask, pose, face) beside the result
        **contact_images(getattr(p.request, "video", None), p.mp4),
        "attempts": rec.attempts, "attempt_count": len(rec.attempts), "seconds": seconds, "timings_s": timings,
        "quality": quality,
        "error": rec.error if rec.status not in ("done", "skipped") else None,
        "failure_class": (getattr(rec, "failure_class", None) or "render") if rec.status == "failed" else None,
        "log": _link(rec.attempts[-1]["log"], out_dir) if rec.attempts else None,
        "gpu_seconds": round(sum(float(a.get("gpu_seconds", 0.0)) for a in rec.attempts), 3),
    }


def _link(path: str | Path, out_dir: Path) -> str:
    """Relative to the report's folder (the folder moves as a whole), POSIX separators for the browser."""
    return Path(os.path.relpath(Path(path).absolute(), Path(out_dir).absolute())).as_posix()


def accounting(shots: list[dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
    """The job's GPU-seconds (every attempt of every shot, failed ones included), money and budget."""
    gpu_s = round(sum(s["gpu_seconds"] for s in shots), 3)
    rate = job.get("gpu_hour_cost")
    for s in shots:
        s["cost"] = None if rate is None else round(s["gpu_seconds"] / 3600 * rate, 6)
    not_started = [s["id"] for s in shots if s["status"] == "not_started"]
    return {"gpu_seconds": gpu_s, "gpu_hours": round(gpu_s / 3600, 6), "gpu_hour_cost": rate,
            "cost": None if rate is None else round(gpu_s / 3600 * rate, 6),
            "budget_gpu_hours": job.get("budget_gpu_hours"), "budget_reached": bool(not_started),
            "not_started": not_started}


def write_accounting_csv(path: Path, shots: list[dict[str, Any]], acct: dict[str, Any]) -> Path:
    """<out>/accounting.csv: one row per shot and a TOTAL row, for a studio's cost sheets."""
    import csv

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["shot", "status", "attempts", "gpu_seconds", "gpu_hours", "cost"])
        for s in shots:
            w.writerow([s["id"], s["status"], s["attempt_count"], f"{s['gpu_seconds']:.3f}",
                        f"{s['gpu_seconds'] / 3600:.6f}", "" if s["cost"] is None else f"{s['cost']:.6f}"])
        w.writerow(["TOTAL", "", sum(s["attempt_count"] for s in shots), f"{acct['gpu_seconds']:.3f}",
                    f"{acct['gpu_hours']:.6f}", "" if acct["cost"] is None else f"{acct['cost']:.6f}"])
    os.replace(tmp, path)
    return path


def write_report(out_dir: str | Path, job: dict[str, Any], records: dict, wall_s: float, *,
                 media_dir: str | Path | None = None, thumbs: bool = True) -> tuple[Path, Path]:
    """report.json + report.html in out_dir. media_dir: where the shots' files are when that is not out_dir (a
    report written elsewhere because out_dir is full); thumbs=False skips decoding frames (the report written at
    the start of a job)."""
    from renderer.video_io import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots = [shot_entry(r, Path(media_dir) if media_dir is not None else out) for r in records.values()]
    if media_dir is not None:  # links relative to media_dir would be wrong from here: absolute ones instead
        for s, r in zip(shots, records.values()):
            s["mp4"] = str(Path(r.shot.mp4).absolute()) if s["mp4"] else None
    counts: dict[str, int] = {}
    for s in shots:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    acct = accounting(shots, job)
    report = {"job": job, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "wall_s": round(wall_s, 2), "counts": counts, "accounting": acct,
              "ok": all(s["status"] in ("done", "skipped") for s in shots), "shots": shots}
    write_accounting_csv(out / "accounting.csv", shots, acct)
    json_path = write_json_atomic(out / "report.json", report)
    uris = {s["id"]: thumbnails(out / s["mp4"]) if thumbs and s["mp4"] and s["status"] in ("done", "skipped",
                                                                                               "released")
            else [] for s in shots}
    for s in shots:
        if s.get("preview"):
            plate = (thumbnails(Path(s["plate"])) or [None, None])[1:2] if thumbs and s.get("plate") else [None]
            uris[s["id"]] = uris[s["id"]] + [None] * (3 - len(uris[s["id"]])) + [_image_uri(s["preview"])] + plate
    html_path = out / "report.html"
    tmp = out / f".report.html.tmp-{os.getpid()}"
    try:
        tmp.write_text(render_html(report, uris), encoding="utf-8")
        os.replace(tmp, html_path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half report behind
        raise
    return json_path, html_path


CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;background:#16181c;color:#e6e6e6}
h1{font-size:20px;margin:0 0 4px} .meta{color:#9aa0a6;margin-bottom:16px} .meta b{color:#e6e6e6}
.counts span{display:inline-block;margin-right:12px;padding:2px 8px;border-radius:10px;background:#2a2e35}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:14px;margin-top:16px}
.shot{background:#1f2228;border:1px solid #2f343c;border-radius:8px;padding:10px 12px}
.shot.st-failed{border-color:#b3261e} .shot h2{font-size:15px;margin:0 0 6px;display:flex;gap:8px;align-items:center}
.badge{font-size:11px;padding:1px 7px;border-radius:9px;text-transform:uppercase;letter-spacing:.04em}
.held{background:#8a4b00}.released{background:#4a3b7a}.tier{background:#6a3d9a}.done{background:#1e5631}.skipped{background:#2b4a6f}.failed{background:#7a1d17}
.queued,.interrupted,.not_started{background:#5c4a12}
.frames{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0} video{height:120px;border-radius:3px;background:#000}
.neg{color:#9aa0a6;font-size:12px;white-space:pre-wrap} .cls{font-weight:600;color:#ffb4ab}
.frames figure{margin:0;text-align:center;font-size:11px;color:#9aa0a6}
.frames img{height:120px;width:auto;image-rendering:pixelated;border-radius:3px;display:block;background:#000;max-width:100%;object-fit:contain}
.noimg{width:160px;height:120px;display:flex;align-items:center;justify-content:center;background:#2a2e35;
  color:#9aa0a6;border-radius:3px}
.prompt{margin:4px 0;white-space:pre-wrap} .kv{color:#9aa0a6;font-size:12px} .kv b{color:#d0d0d0;font-weight:600}
.error{color:#ffb4ab;background:#3b1512;padding:6px 8px;border-radius:4px;margin-top:6px;white-space:pre-wrap}
details{margin-top:18px;color:#9aa0a6} pre{white-space:pre-wrap;font-size:12px}
#thumbcheck{margin-top:8px;color:#9aa0a6;font-size:12px}
"""

# Runs after load: records how many thumbnails decoded, so a headless browser test (or a person) can tell.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.thumb'));
  var broken = imgs.filter(function (im) { return !(im.complete && im.naturalWidth > 0); });
  document.body.setAttribute('data-thumbs-total', String(imgs.length));
  document.body.setAttribute('data-thumbs-ok', String(imgs.length - broken.length));
  document.body.setAttribute('data-thumbs-broken',
    broken.map(function (im) { return im.getAttribute('data-shot') + '/' + im.getAttribute('data-which'); }).join(' '));
  var note = document.getElementById('thumbcheck');
  if (note) { note.textContent = (imgs.length - broken.length) + ' of ' + imgs.length + ' thumbnails decoded'; }
});
"""


def _fmt_s(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f}s"


def tier_badge(quality: str | None) -> str:
    """A badge for draft / fast renders: they are never finals (exact renders get none)."""
    if not quality or quality == "exact":
        return ""
    return f'<span class="badge tier" title="quality tier: not a final">{html.escape(quality)}</span>'


def _shot_card(s: dict[str, Any], uris: list[str]) -> str:
    e = html.escape
    status = s["status"]
    frames_html = []
    for which, label in enumerate(("first", "middle", "last")):
        if which < len(uris) and uris[which]:
            img = (f'<img class="thumb" alt="{e(s["id"])} {label} frame" data-shot="{e(s["id"])}" '
                   f'data-which="{label}" src="{uris[which]}">')
        else:
            img = '<div class="noimg">no frame</div>'
        frames_html.append(f"<figure>{img}<figcaption>{label}</figcaption></figure>")
    if len(uris) > 3 and uris[3]:  # Animate: what the shot was driven by, beside what came out
        frames_html.insert(0, f'<figure><img class="thumb preview" alt="{e(s["id"])} preprocessing preview" '
                              f'data-shot="{e(s["id"])}" data-which="preview" src="{uris[3]}">'
                              '<figcaption>plate · pose · face (preprocessing)</figcaption></figure>')
    if len(uris) > 4 and uris[4]:  # Animate: the plate itself (its middle frame) first
        frames_html.insert(0, f'<figure><img class="thumb plate" alt="{e(s["id"])} plate" data-shot="{e(s["id"])}" '
                              f'data-which="plate" src="{uris[4]}"><figcaption>plate</figcaption></figure>')
    t = s.get("timings_s") or {}
    timing = " · ".join(f"{k} {_fmt_s(t[k])}" for k in ("text_encode", "denoise", "vae_decode", "mp4_write",
                                                         "model_load") if t.get(k) is not None)
    attempts = "; ".join(f"#{a['attempt']} {a.get('status', 'running')} on {a.get('group', '?')}"
                         + (f" as {a['layout']['effective']}" if (a.get("layout") or {}).get("folded_idle_cfg")
                            else "")  # a shot without CFG ran with the cfg half folded in
                         + (f" ({_fmt_s(a.get('seconds'))})" if a.get("seconds") is not None else "")
                         for a in s["attempts"]) or ("none this run (already rendered)" if status == "skipped"
                                                    else "none")
    tags = s["tags"]
    tags_txt = ", ".join(f"{k}={v}" for k, v in tags.items()) if isinstance(tags, dict) else ", ".join(map(str, tags))
    cls = (f'<span class="cls">{e(s["failure_class"])} failure</span>: '
           if s.get("failure_class") else "")
    error = (f'<div class="error">{cls}{e(s["error"] or "")}\nlog: {e(s["log"] or "-")}</div>'
             if status not in ("done", "skipped", "held", "released") else "")
    file_line = f'<a href="{e(s["mp4"])}"><b>{e(s["mp4"])}</b></a>' if s["mp4"] else "-"
    poster = f' poster="{uris[0]}"' if uris and uris[0] else ""
    video = (f'<figure><video controls preload="none"{poster} src="{e(s["mp4"])}" data-shot="{e(s["id"])}">'
             f'</video><figcaption>play</figcaption></figure>'
             if s["mp4"] and status in ("done", "skipped", "released") else "")
    neg = s.get("negative_prompt")
    if neg is None:
        from renderer.encoders.text import DEFAULT_NEGATIVE_PROMPT

        neg_html = f'<div class="neg">negative (the official default): {e(DEFAULT_NEGATIVE_PROMPT)}</div>'
    else:
        neg_html = f'<div class="neg">negative: {e(neg) or "(empty)"}</div>'
    from jobs.report_safety import provenance_html

    notes = provenance_html(s)  # prompt fields, held / released, provenance and signature
    return f"""
<section class="shot st-{e(status)}" id="shot-{e(s['id'])}">
  <h2>{e(s['id'])} <span class="badge {e(status)}">{e(status)}</span>{tier_badge(s.get('quality'))}</h2>
  <div class="frames">{''.join(frames_html)}{video}</div>
  <div class="prompt">{e(s['prompt'])}</div>
  {neg_html}
  <div class="kv">seed <b>{s['seed']}</b> · priority <b>{s['priority']}</b> · {e(s['task'])} <b>{e(s['size'])}</b>
   · <b>{s['frames']}</b> frames · <b>{s['steps']}</b> steps {e(s['sampler'])} · guidance <b>{e(str(s['guidance']))}</b></div>
  <div class="kv">attempts: <b>{e(attempts)}</b> · render {_fmt_s(s['seconds'])}{' · ' + e(timing) if timing else ''}</div>
  <div class="kv">GPU time <b>{s.get('gpu_seconds', 0.0):.1f} GPU-s</b>{_cost_txt(s.get('cost'))}</div>
  <div class="kv">file {file_line}{' · tags ' + e(tags_txt) if tags_txt else ''}</div>
  {error}{notes}
</section>"""


def _cost_txt(cost: float | None) -> str:
    return "" if cost is None else f" · cost <b>{cost:.2f}</b>"


def _accounting_html(acct: dict[str, Any] | None) -> str:
    if not acct:
        return ""
    e = html.escape
    rate = acct.get("gpu_hour_cost")
    money = f" · cost <b>{acct['cost']:.2f}</b> (at {rate:g} per GPU-hour)" if rate is not None else ""
    budget = acct.get("budget_gpu_hours")
    line = (f'<div class="meta" id="accounting">GPU time <b>{acct["gpu_seconds"]:.1f} GPU-s</b> '
            f'({acct["gpu_hours"]:.4f} GPU-hours, every attempt counted){money}'
            + (f" · budget {budget:g} GPU-hours" if budget is not None else "") + " · <a href=\"accounting.csv\">"
            "accounting.csv</a></div>")
    if acct.get("not_started"):
        line += (f'<div class="error" id="not-started">budget reached: {len(acct["not_started"])} shot(s) not '
                 f'started: {e(", ".join(acct["not_started"]))}</div>')
    return line


def render_html(report: dict[str, Any], thumbs: dict[str, list[str]]) -> str:
    from jobs.report_safety import CSS as SAFETY_CSS

    e = html.escape
    job = report["job"]
    counts = " ".join(f"<span>{e(k)} {v}</span>" for k, v in sorted(report["counts"].items()))
    dash = job.get("dashboard") if job.get("running") else None  # a dead link after the job is worse than none
    dash_html = f' · running: Ray dashboard <a href="{e(str(dash))}"><b>{e(str(dash))}</b></a>' if dash else ""
    if job.get("stopped"):
        dash_html += f'<div class="error">the job stopped: {e(str(job["stopped"]))}</div>'
    if job.get("report_error"):
        dash_html += f'<div class="error">written here because the output folder failed: ' \
                     f'{e(str(job["report_error"]))}</div>'
    cards = "".join(_shot_card(s, thumbs.get(s["id"], [])) for s in report["shots"])
    events = "\n".join(job.get("events") or [])
    title = f"wanrender report: {job.get('name', 'job')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title><style>{CSS}{SAFETY_CSS}</style></head>
<body data-thumbs-total="" data-thumbs-ok="">
<h1>{e(title)} {'✓' if report['ok'] else '✗'}</h1>
<div class="meta">model <b>{e(str(job.get('model')))}</b> ({e(str(job.get('fingerprint')))}) · manifest
 <b>{e(str(job.get('manifest')))}</b> · submitted {e(str(job.get('submitted_at')))} · wall
 <b>{e(format_duration(report['wall_s']))}</b> · {job.get('gpus_per_group', 1)} GPU(s) per group{dash_html}</div>
{_accounting_html(report.get("accounting"))}
<div class="counts">{counts}</div>
<div id="thumbcheck">checking thumbnails…</div>
<div class="sheet">{cards}</div>
<details><summary>job events</summary><pre>{e(events) or 'none'}</pre></details>
<script>{CHECK_SCRIPT}</script>
</body></html>
"""
