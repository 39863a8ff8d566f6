"""The quarantine on the farm's side: which shots the safety gate holds, and `wanrender release`.

A held shot's MP4 and sidecar sit in <out>/quarantine/ under their final names. Releasing one is a person's
decision: `wanrender release <out> <shot> --by NAME --reason TEXT` moves both into <out>/ (sidecar last, so the
planner never sees a half-released shot), records who released it, when and why in the sidecar and in the
append-only <out>/quarantine/releases.jsonl, and updates report.json / report.html when they exist. It never
overwrites a delivered file.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from renderer.safety import QUARANTINE_DIR, held_sidecar  # noqa: F401  (re-exported for the farm)

RELEASE_LOG = "releases.jsonl"


class ReleaseError(ValueError):
    pass


def release(out_dir: str | Path, shot: str, by: str, reason: str) -> dict[str, Any]:
    """Deliver a held shot; returns the release record. ReleaseError with the fix for anything that is wrong."""
    from renderer.video_io import read_json, write_json_atomic

    out = Path(out_dir)
    if not by.strip():
        raise ReleaseError("--by must name the person releasing the shot")
    if not reason.strip():
        raise ReleaseError("--reason must say why the shot may be delivered")
    if not shot or Path(shot).name != shot or shot.startswith("."):
        raise ReleaseError(f"shot {shot!r} must be the held MP4's name without folder or .mp4 (e.g. sh010)")
    qdir = out / QUARANTINE_DIR
    q_mp4, q_side = qdir / f"{shot}.mp4", qdir / f"{shot}.json"
    if not q_mp4.is_file() or not q_side.is_file():
        held = sorted(p.stem for p in qdir.glob("*.mp4")) if qdir.is_dir() else []
        raise ReleaseError(f"shot {shot} is not held in {qdir}: held shots: {', '.join(held) or 'none'}")
    mp4, side = out / q_mp4.name, out / q_side.name
    if mp4.exists() or side.exists():
        raise ReleaseError(f"{mp4} or its sidecar already exists: move it away first (a release never overwrites "
                           f"a delivered file)")
    meta = read_json(q_side)
    record = {"shot": shot, "released_by": by, "reason": reason, "released_at":
              time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "account": _account(),
              "safety": meta.get("safety")}
    meta["release"] = record
    with open(qdir / RELEASE_LOG, "a", encoding="utf-8") as f:  # the audit trail is written first
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(q_mp4, mp4)  # same file system: atomic, the signed bytes unchanged
    write_json_atomic(side, meta)  # the sidecar lands last: only now does the shot count as delivered
    q_side.unlink()
    _update_report(out, shot, record)
    return record


def _account() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _update_report(out: Path, shot: str, record: dict[str, Any]) -> None:
    """Mark the shot released in report.json and re-write report.html from it (when the job left them)."""
    from renderer.video_io import read_json, write_json_atomic

    path = out / "report.json"
    if not path.is_file():
        return
    report = read_json(path)
    for s in report.get("shots", []):
        if s.get("output", s.get("id")) == shot or s.get("id") == shot:
            s["status"], s["release"] = "released", record
            s["mp4"] = f"{shot}.mp4"
    counts: dict[str, int] = {}
    for s in report.get("shots", []):
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    report["counts"] = counts
    report["ok"] = all(s["status"] in ("done", "skipped", "released") for s in report.get("shots", []))
    write_json_atomic(path, report)
    from jobs.report import render_html, thumbnails

    thumbs = {s["id"]: thumbnails(out / s["mp4"]) if s.get("mp4") else [] for s in report.get("shots", [])}
    tmp = out / f".report.html.tmp-{os.getpid()}"
    tmp.write_text(render_html(report, thumbs), encoding="utf-8")
    os.replace(tmp, out / "report.html")


def cmd_release(argv: list[str]) -> int:
    """wanrender release OUT SHOT --by NAME --reason TEXT"""
    ap = argparse.ArgumentParser(prog="wanrender release", description="Deliver a shot the content-safety gate "
                                 "held in OUT/quarantine/, recording who released it and why.")
    ap.add_argument("out", help="the job's output folder")
    ap.add_argument("shot", help="the shot's output name (the MP4's stem)")
    ap.add_argument("--by", required=True, help="who releases it (recorded)")
    ap.add_argument("--reason", required=True, help="why it may be delivered (recorded)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    try:
        rec = release(args.out, args.shot, args.by, args.reason)
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"released {args.shot} by {rec['released_by']} at {rec['released_at']}: {rec['reason']} -> "
          f"{Path(args.out) / (args.shot + '.mp4')}")
    return 0
