"""Structured shot prompts: the pre-vis template's fields composed into the one prompt the text encoder reads.

A shot's `prompt` may be plain text (used as written) or a mapping of the template's fields, with English or
Chinese keys:

    field      key aliases           required   example
    character  人物 / character       yes        "an old lighthouse keeper in a yellow oilskin"
    action     动作 / action          yes        "climbs the spiral staircase with an oil lamp"
    scene      环境 / scene           yes        "inside a stone tower during a storm"
    camera     镜头 / camera          no         "medium shot, handheld, slow push in"
    style      风格 / style           no         "cinematic pre-vis, muted colours"
    lighting   光线 / lighting        no         "warm lamp light, blue storm light through windows"

Composition order is the table's order: who, doing what, where, then how it is filmed (camera), how it looks
(style) and how it is lit (lighting). This follows the Wan2.2 prompt guide's formula (subject + scene + motion,
then camera language and aesthetics), which is also why character, action and scene are the required fields:
without them the model has nothing to put in the frame. Parts are joined with ", " — or with the Chinese comma
"，" when any part is Chinese, so a Chinese prompt reads as one Chinese sentence. Empty fields are left out.

A manifest may set project-wide fields (usually style and lighting) as a mapping under `defaults.prompt`;
a shot's own fields override them field by field. A plain-text shot prompt is used as written: the defaults
cannot know where to splice into free text.

Pure functions only: no I/O, no config.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping

FIELDS = ("character", "action", "scene", "camera", "style", "lighting")  # composition order
REQUIRED = ("character", "action", "scene")
CHINESE_KEYS = {"人物": "character", "动作": "action", "环境": "scene", "镜头": "camera", "风格": "style",
                "光线": "lighting"}
ENGLISH_OF = {v: k for k, v in CHINESE_KEYS.items()}  # canonical -> Chinese key, for messages
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_TRAILING = " \t\n,，.。;；、"


class PromptError(ValueError):
    """A structured prompt that cannot be composed; `field` names the offending field (canonical English)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def is_structured(prompt: Any) -> bool:
    return isinstance(prompt, Mapping)


def canonical_key(key: Any) -> str | None:
    """'人物' / 'Character' / 'character' -> 'character'; None for a key that is not a template field."""
    k = str(key).strip()
    if k in CHINESE_KEYS:
        return CHINESE_KEYS[k]
    k = k.lower()
    return k if k in FIELDS else None


def _field_name(canonical: str) -> str:
    return f"{canonical} ({ENGLISH_OF[canonical]})"


def normalize_fields(fields: Mapping[Any, Any]) -> dict[str, str]:
    """Canonical English keys, stripped text values, empty values dropped. PromptError on an unknown key, a
    key given twice (人物 and character) or a value that is not text."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        canon = canonical_key(key)
        if canon is None:
            known = ", ".join(f"{f}/{ENGLISH_OF[f]}" for f in FIELDS)
            raise PromptError(str(key), f"unknown prompt field {key!r}: use one of {known}")
        if canon in out:
            raise PromptError(canon, f"prompt field {_field_name(canon)} is given twice (English and Chinese "
                                     f"keys): keep one")
        if value is None:
            continue
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise PromptError(canon, f"prompt field {_field_name(canon)} must be text, got "
                                     f"{type(value).__name__} {value!r}: quote it")
        text = str(value).strip()
        if text:
            out[canon] = text
    return out


def merge_fields(defaults: Mapping[Any, Any] | None, shot: Mapping[Any, Any]) -> dict[str, str]:
    """The manifest's project-wide fields overridden field by field by the shot's own."""
    merged = normalize_fields(defaults or {})
    merged.update(normalize_fields(shot))
    return merged


def missing_fields(fields: Mapping[str, str]) -> list[str]:
    return [f for f in REQUIRED if not fields.get(f)]


def compose(fields: Mapping[Any, Any]) -> str:
    """One prompt from the fields, in FIELDS order. PromptError naming the first missing required field."""
    norm = normalize_fields(fields)
    missing = missing_fields(norm)
    if missing:
        f = missing[0]
        raise PromptError(f, f"structured prompt lacks {_field_name(f)}: add `{f}:` (or `{ENGLISH_OF[f]}:`) to "
                             f"the shot's prompt (required: {', '.join(REQUIRED)})")
    parts = [norm[f].strip(_TRAILING) for f in FIELDS if f in norm]
    parts = [p for p in parts if p]
    chinese = any(_CJK.search(p) for p in parts)
    return ("，" if chinese else ", ").join(parts) + ("。" if chinese else "")


def resolve_prompt(prompt: Any, defaults: Any = None) -> tuple[str, dict[str, str] | None]:
    """(composed prompt, fields or None) for a shot's `prompt` value and the manifest's `defaults.prompt`.

    Plain text stays as written (fields None). A mapping is merged over the mapping defaults and composed.
    """
    if prompt is None and is_structured(defaults):
        prompt = {}
    if not is_structured(prompt):
        return ("" if prompt is None else str(prompt)), None
    fields = merge_fields(defaults if is_structured(defaults) else None, prompt)
    return compose(fields), fields


def prompt_hash(prompt: str) -> str:
    """SHA-256 of the composed prompt's UTF-8 bytes: what provenance records instead of trusting the text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()
