"""The contact sheet's safety and provenance lines for one shot: the structured prompt's fields, a held shot's
reason and score (its frames are not shown), a release, and the provenance record with the signature state."""
from __future__ import annotations

import html
from typing import Any

from renderer.prompts import ENGLISH_OF, FIELDS

CSS = """
.fields{border-collapse:collapse;margin:4px 0;font-size:12px} .fields td{padding:1px 8px 1px 0;vertical-align:top}
.fields td.k{color:#9aa0a6;white-space:nowrap} .held-note{color:#ffd8a8;background:#3b2812;padding:6px 8px;
border-radius:4px;margin-top:6px} .prov{color:#9aa0a6;font-size:11px;margin-top:4px;word-break:break-all}
"""


def c2pa_check(mp4) -> dict[str, Any]:
    """The delivered file's C2PA manifest read back (signature, content hash), as the report keeps it."""
    from renderer.media_provenance import verify_mp4

    try:
        v = verify_mp4(mp4)
    except (OSError, ValueError) as e:
        return {"ok": False, "error": str(e)}
    return {"ok": v.ok, "signature_valid": v.signature_valid, "content_hash_valid": v.content_hash_valid,
            "failures": v.failures, "error": v.error}


def provenance_html(s: dict[str, Any]) -> str:
    e = html.escape
    parts = []
    fields = s.get("prompt_fields") or {}
    if fields:
        rows = "".join(f'<tr><td class="k">{e(ENGLISH_OF[f])} {f}</td><td>{e(str(fields[f]))}</td></tr>'
                       for f in FIELDS if f in fields)
        parts.append(f'<table class="fields">{rows}</table>')
    safety = s.get("safety") or {}
    if s.get("status") == "held":
        parts.append(f'<div class="held-note">HELD by the content-safety gate: {e(str(safety.get("reason")))} '
                     f'(score {safety.get("score")}, {e(str(safety.get("detector")))}); frames not shown. '
                     f'Release after review: wanrender release OUT {e(s["output"])} --by NAME --reason ...</div>')
    rel = s.get("release")
    if rel:
        parts.append(f'<div class="held-note">released by <b>{e(str(rel.get("released_by")))}</b> at '
                     f'{e(str(rel.get("released_at")))}: {e(str(rel.get("reason")))}</div>')
    rec = s.get("provenance")
    if rec:
        check = s.get("c2pa_check") or {}
        signed = ("not signed (no provenance.cert/key)" if not s.get("c2pa_signed") else
                  "C2PA signed, read back: signature and content hash valid" if check.get("ok") else
                  f"C2PA signed, read back: INVALID {check.get('failures') or check.get('error') or ''}")
        screened = (f"screened {len(safety.get('frames_checked', []))} frames, top score {safety.get('score')}"
                    if safety else "output not screened")
        parts.append(f'<div class="prov">{e(signed)} · {e(str(rec.get("model")))} {e(str(rec.get("model_version")))}'
                     f' · tier {e(str(rec.get("tier")))} · prompt sha256 {e(str(rec.get("prompt_sha256"))[:16])}… · '
                     f'{e(screened)}</div>')
    return "".join(parts)
