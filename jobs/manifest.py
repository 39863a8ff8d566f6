"""A job manifest: job-level `defaults` plus a list of `shots`, from YAML, JSON or a CSV shot list.

    name: seq010_previs            # optional job name
    model: tiny_t2v                # optional; else the config's model (a manifest renders with one model)
    defaults: {steps: 4, size: "64*48", tags: {seq: "010"}}
    shots:
      - {id: sh010, prompt: "...", seed: 7, priority: high}

Precedence, strongest first (issue 15):
    the command line (job.shot_defaults.steps=2, model=...)  >  the shot  >  the manifest's defaults  >  model preset
The command line wins because it is what the submitter asked for right now (a quick low-step check of a
finished manifest); every value it overrides in the manifest is listed in `Manifest.overrides`, and the farm
prints those lines, so nothing is overridden silently.

`validate_manifest` checks the WHOLE manifest and raises ManifestError with every problem at once, each naming
the shot, the field and the fix. It touches no GPU and no Ray: bad input is refused before anything is reserved.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renderer.pipeline import ShotSpec
from renderer.presets import ModelPreset, check_shot
from renderer.prompts import PromptError, is_structured, normalize_fields, resolve_prompt

# what a shot (and `defaults`) may set; the farm's own fields (priority, output, tags, video) are not ShotSpec's
SHOT_FIELDS = ("id", "task", "prompt", "negative_prompt", "image", "video", "size", "frames", "steps", "seed",
               "guidance", "sampler", "shift", "priority", "output", "tags", "mask", "refert_num", "loras",
               "quality", "label")
NOT_DEFAULTABLE = ("id", "output")  # one value per shot: a default would make every shot collide
TOP_LEVEL_FIELDS = ("name", "model", "description", "defaults", "shots")
TEXT_FIELDS = ("task", "prompt", "negative_prompt", "sampler", "quality")
PATH_FIELDS = ("image", "video", "mask")
INT_FIELDS = ("frames", "steps", "seed")
DEFAULT_PRIORITIES = {"urgent": 100, "high": 10, "normal": 0, "low": -10}
# column names spreadsheets and other tools use for our fields (difflib alone maps "shot_id" to "shift")
FIELD_ALIASES = {"shot_id": "id", "shot": "id", "shotid": "id", "name": "id", "shot_name": "id", "seq": "tags",
                 "negative": "negative_prompt", "neg": "negative_prompt", "neg_prompt": "negative_prompt",
                 "text": "prompt", "description": "prompt", "cfg": "guidance", "guidance_scale": "guidance",
                 "cfg_scale": "guidance", "num_frames": "frames", "length": "frames", "num_steps": "steps",
                 "sampling_steps": "steps", "resolution": "size", "res": "size", "scheduler": "sampler",
                 "solver": "sampler", "sample_shift": "shift", "input_image": "image", "img": "image",
                 "file": "output", "filename": "output", "prio": "priority"}
KEEP_SPACES = ("id", "output")  # a name is never trimmed silently: a stray space is reported, not dropped

# an id becomes a file name on every OS a studio uses; these names are taken by the farm's own files
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")
RESERVED_NAMES = {"report", "config", "logs", "con", "prn", "aux", "nul",
                  *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Problem:
    shot: str  # shot id, "#<n>" for an entry without a usable id, or "manifest" for job-level problems
    field: str
    message: str  # what is wrong and how to fix it

    def __str__(self) -> str:
        where = "manifest" if self.shot == "manifest" else f"shot {self.shot}"
        return f"{where}: {self.field}: {self.message}"


class ManifestError(ValueError):
    """Every problem found in a manifest; raised before any resource is reserved."""

    def __init__(self, problems: list[Problem], source: str = "manifest"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}:\n{lines}")


@dataclass(frozen=True)
class ShotRequest:
    """One validated manifest entry, defaults applied (not yet resolved against the model preset)."""

    id: str
    output: str  # file stem: <out>/<output>.mp4
    spec: ShotSpec
    priority: int
    index: int  # position in the manifest: ties in priority keep manifest order
    tags: dict | list = field(default_factory=dict)
    video: str | None = None  # animate/replace: the plate, or a folder `wanrender prepare` made
    mask: str | None = None
    refert_num: int | None = None
    loras: list | None = None
    clip_plan: object | None = None  # animate/replace: renderer.prepare.shots.ClipPlan (clips, estimate)
    quality: str = "exact"  # the shot's tier (renderer/tiers.py); job.tiers renders every shot in several
    prompt_fields: dict | None = None  # a structured prompt's fields (renderer/prompts.py); None for plain text
    label: bool = False  # burn the visible AI label into the frames


@dataclass
class Manifest:
    source: str
    name: str
    model: str | None
    shots: list[ShotRequest]
    defaults: dict[str, Any]
    overrides: list[str] = field(default_factory=list)  # one line per manifest value the command line overrode


# -- reading --------------------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The raw manifest dict from .yaml/.yml/.json/.csv. Unreadable files raise ManifestError (no traceback)."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError([Problem("manifest", "manifest", f"file {p} does not exist: check the path "
                                                             f"(manifest=examples/previs.yaml)")], str(p))
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often save CSV with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError([Problem("manifest", "manifest", f"cannot read {p}: {e}; save it as UTF-8")], str(p))
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return parse_csv(text, str(p))
    if suffix not in (".yaml", ".yml", ".json"):
        raise ManifestError([Problem("manifest", "manifest", f"unknown manifest type {p.suffix!r}: use .yaml, "
                                                             f".json or .csv")], str(p))
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml/json errors carry the line and column: show them, not a traceback
        raise ManifestError([Problem("manifest", "syntax", f"{' '.join(str(e).split())}: fix the "
                                                           f"{suffix.lstrip('.').upper()} syntax there")], str(p))
    if isinstance(data, list):  # a bare list of shots is a manifest without defaults
        data = {"shots": data}
    if not isinstance(data, dict):
        raise ManifestError([Problem("manifest", "shots", "the manifest must be a mapping with a `shots` list "
                                                          "(and optional `defaults`)")], str(p))
    return data


def _csv_value(column: str, cell: str) -> Any:
    """Spreadsheet text -> the value a YAML manifest would hold. Unparseable text stays text, so the validator
    reports it with the field and the fix instead of this function failing. Names keep their spaces (reported)."""
    if column in KEEP_SPACES:
        return cell
    cell = cell.strip()
    if column == "label" and cell.lower() in ("true", "yes", "1", "false", "no", "0"):
        return cell.lower() in ("true", "yes", "1")
    if column in INT_FIELDS or column == "priority":
        try:
            return int(cell)
        except ValueError:
            return cell
    if column in ("guidance", "shift"):
        parts = [c for c in re.split(r"[;/ ]+|,\s*", cell.strip("[]()")) if c]
        try:
            nums = [float(c) for c in parts]
        except ValueError:
            return cell
        return nums[0] if len(nums) == 1 else nums
    if column == "tags":
        items = [c.strip() for c in re.split(r"[;|]", cell) if c.strip()]
        if items and all("=" in c for c in items):
            return {k.strip(): v.strip() for k, v in (c.split("=", 1) for c in items)}
        return items
    return cell


def parse_csv(text: str, source: str = "manifest.csv") -> dict[str, Any]:
    """A shot list kept in a spreadsheet: one row per shot, one column per field (header row first).

    Empty cells are unset (the defaults apply). tags: "key=value; key=value" or "a; b"; columns named
    tags.<key> add one tag each. guidance: "3.5" or "3.0;4.0". Rows whose id starts with '#' are comments.
    """
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise ManifestError([Problem("manifest", "syntax", f"CSV: {e}: save the sheet as plain CSV (UTF-8)")], source)
    if not rows or not any(c.strip() for c in rows[0]):
        raise ManifestError([Problem("manifest", "shots", "the CSV is empty: the first row must name the columns "
                                                          f"({', '.join(SHOT_FIELDS[:4])}, ...)")], source)
    header = [c.strip() for c in rows[0]]
    shots = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if row and row[0].strip().startswith("#"):
            continue
        shot: dict[str, Any] = {"_row": line}
        for column, cell in zip(header, row):
            if not column or not cell.strip():
                continue
            if column.startswith("tags."):
                tags = shot.setdefault("tags", {})
                if isinstance(tags, dict):
                    tags[column[5:]] = cell.strip()
                continue
            if column.startswith("prompt."):  # one column per structured-prompt field: prompt.人物, prompt.action
                fields = shot.setdefault("prompt", {})
                if isinstance(fields, dict):
                    fields[column[7:]] = cell.strip()
                continue
            shot[column] = _csv_value(column, cell)
        if len(row) > len(header) and any(c.strip() for c in row[len(header):]):
            shot["_extra_cells"] = len(row) - len(header)
        shots.append(shot)
    return {"shots": shots}


# -- validation -----------------------------------------------------------------------------------------------------
def safe_name(text: str) -> str:
    """A file-name-safe version of `text`, offered as the fix for an unsafe id or output."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")[:120] or "shot"
    return f"{s}_shot" if s.lower() in RESERVED_NAMES else s


def _name_problem(value: Any, what: str) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML reads a bare 010 as the number 8 (octal): a shot number must be quoted to survive
        return (f"{what} {value!r} was read as a number: quote it (\"{value}\", or \"0{value}\" if it had leading "
                f"zeros) so it stays the name you wrote")
    if not isinstance(value, str):
        return f"{what} must be text, got {type(value).__name__} {value!r}: write it as a quoted string"
    value = str(value)
    if value != value.strip():
        return (f"{what} {value!r} has leading or trailing spaces: remove them (use {value.strip()!r}); ids are "
                f"never changed silently, since the name is how the shot is found again")
    if not SAFE_NAME.match(value) or value.endswith("."):
        return (f"{what} {value!r} is not a safe file name (letters, digits, '.', '_', '-'; starts with a letter "
                f"or digit; at most 120 characters): use {safe_name(value)!r}")
    if value.lower() in RESERVED_NAMES:
        return f"{what} {value!r} is a name the farm or the OS reserves: use {safe_name(value)!r}"
    return None


def _suggest(name: str, known: tuple[str, ...]) -> str:
    low = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    alias = FIELD_ALIASES.get(low)
    if alias in known:
        return f"did you mean {alias!r}?"
    # a field named as one word of the column ("shot_id" -> id, "negative" -> negative_prompt)
    words = set(re.split(r"[_.]+", low))
    by_word = [k for k in known if k in words] or [k for k in known if any(w and k.startswith(w) and len(w) >= 3
                                                                           for w in words)]
    if len(by_word) == 1:
        return f"did you mean {by_word[0]!r}?"
    close = difflib.get_close_matches(low, known, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(name: str, value: Any, priorities: dict[str, int]) -> str | None:
    """Type/range problem of one field's value (model-independent), or None."""
    if value is None:
        return None
    if name == "prompt" and is_structured(value):
        return None  # a structured prompt: its fields are checked when it is composed
    if name == "label" and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    if name in TEXT_FIELDS and not isinstance(value, str):
        return f"must be text, got {type(value).__name__} {value!r}: quote it"
    if name in PATH_FIELDS and not isinstance(value, str):
        return f"must be a file path, got {type(value).__name__} {value!r}"
    if name == "size" and not isinstance(value, str):
        return f"must be text WIDTH*HEIGHT like \"64*48\", got {value!r}"
    if name in INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = f" (use {int(value)})" if _is_number(value) and float(value).is_integer() else ""
            return f"must be a whole number, got {type(value).__name__} {value!r}{hint}"
        # ShotSpec.resolve reads 0 as "unset" (`steps or preset.steps`), so 0 must be caught here, not later
        if name == "steps" and value < 1:
            return f"steps must be a positive whole number, got {value}"
        if name == "frames" and value < 1:
            return f"frames must be 4n+1 (e.g. 9 or 13), got {value}"
        if name == "seed" and not -1 <= value <= SEED_MAX:
            return f"seed {value} is out of range: use 0 .. 2**63-1, or -1 for a random seed"
    if name == "guidance":
        vals = value if isinstance(value, (list, tuple)) else [value]
        if len(vals) not in (1, 2) or not all(_is_number(v) for v in vals):
            return f"must be a number or [low_noise, high_noise], got {value!r}: e.g. 5.0 or [3.0, 4.0]"
        if not all(math.isfinite(v) for v in vals):  # YAML .nan / .inf: a grey clip and NaN in every JSON
            return f"guidance must be a finite number, got {value!r}: e.g. 5.0 or [3.0, 4.0]"
        if any(v < 0 for v in vals):
            return f"guidance scales must be >= 0, got {value!r}"
    if name == "quality":
        from renderer.tiers import TIER_NAMES

        if value not in TIER_NAMES:
            return f"unknown quality {value!r}: {_suggest(value, TIER_NAMES)} (one of {', '.join(TIER_NAMES)})"
    if name == "sampler":
        from renderer.sampling import SAMPLER_NAMES

        if value not in SAMPLER_NAMES:
            return f"unknown sampler {value!r}: {_suggest(value, SAMPLER_NAMES)} (one of {', '.join(SAMPLER_NAMES)})"
    if name == "shift" and _is_number(value) and not math.isfinite(value):
        return f"shift must be a finite number, got {value!r}: e.g. 5.0 (the preset's is usually right)"
    if name == "shift" and (not _is_number(value) or value <= 0):
        return f"must be a positive number, got {value!r}"
    if name == "priority":
        if isinstance(value, str) and value in priorities:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            names = ", ".join(f"{k} ({v})" for k, v in priorities.items())
            return f"priority {value!r} is neither a whole number nor a named priority: use a number or {names}"
    if name == "loras" and not (isinstance(value, list) and all(isinstance(v, (str, dict)) for v in value)):
        return f"must be a list of LoRA files (or {{path: ..., scale: ...}}), got {value!r}"
    if name == "tags":
        if isinstance(value, dict):
            bad = [k for k, v in value.items() if isinstance(v, (dict, list))]
            if bad:
                return f"tag values must be plain text or numbers; {bad[0]!r} holds a {type(value[bad[0]]).__name__}"
        elif not (isinstance(value, list) and all(isinstance(t, (str, int, float)) for t in value)):
            return f"must be a mapping (scene: \"010\") or a list of words, got {value!r}"
    return None


def _plain_tags(tags: Any) -> Any:
    """Tags as JSON-safe values (YAML turns 2026-01-05 into a date, which no sidecar could hold)."""
    def plain(v: Any) -> Any:
        return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)

    if isinstance(tags, dict):
        return {str(k): plain(v) for k, v in tags.items()}
    if isinstance(tags, list):
        return [plain(v) for v in tags]
    return tags


def _merge_tags(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **over}
    if isinstance(base, list) and isinstance(over, list):
        return base + [t for t in over if t not in base]
    return over if over is not None else base


def _override_lines(manifest_defaults: dict, entries: list, cli: dict) -> list[str]:
    """'command line job.shot_defaults.steps=2 overrides the manifest: defaults.steps 3; steps on shot b (5)'."""
    lines = []
    for k, v in cli.items():
        if k == "tags":
            continue  # tags from the command line are added to the shot's, not swapped for them
        where = [f"defaults.{k} {manifest_defaults[k]!r}"] if k in manifest_defaults and manifest_defaults[k] != v \
            else []
        shots = [f"{e.get('id', '?')} ({e[k]!r})" for e in entries if isinstance(e, dict) and e.get(k) is not None
                 and e[k] != v]
        if shots:
            more = f" and {len(shots) - 5} more" if len(shots) > 5 else ""
            where.append(f"{k} on shot{'s' if len(shots) > 1 else ''} {', '.join(shots[:5])}{more}")
        if where:
            lines.append(f"command line job.shot_defaults.{k}={v} overrides the manifest: {'; '.join(where)}")
    return lines


def _resolve_path(value: str | None, base_dir: Path) -> str | None:
    if not value:
        return None
    p = Path(value).expanduser()
    try:
        return str(p if p.is_absolute() else (base_dir / p).resolve())
    except (ValueError, OSError):  # a NUL byte or a loop in the path: left as given, the image check names it
        return str(base_dir / p)


def validate_manifest(raw: dict[str, Any], preset: ModelPreset, *, base_dir: str | Path = ".",
                      config_defaults: dict | None = None, priorities: dict[str, int] | None = None,
                      source: str = "manifest") -> Manifest:
    """Check everything and return the shots with defaults applied; ManifestError lists every problem found.

    Relative image/video paths are relative to the manifest's folder (base_dir), so a manifest and its inputs
    move together.
    """
    problems: list[Problem] = []
    priorities = dict(DEFAULT_PRIORITIES if priorities is None else priorities)
    base_dir = Path(base_dir)
    for key in raw:
        if key not in TOP_LEVEL_FIELDS:
            problems.append(Problem("manifest", str(key), f"unknown top-level field: {_suggest(key, TOP_LEVEL_FIELDS)}"
                                                          f" (shot settings go under `defaults` or a shot)"))
    manifest_defaults = raw.get("defaults") or {}
    if not isinstance(manifest_defaults, dict):
        problems.append(Problem("manifest", "defaults", f"must be a mapping of shot fields, got {manifest_defaults!r}"))
        manifest_defaults = {}
    manifest_defaults = {k: v for k, v in manifest_defaults.items() if v is not None}  # `steps:` left empty: unset
    cfg_defaults = {k: v for k, v in (config_defaults or {}).items() if v is not None}
    for origin, d in (("defaults", manifest_defaults), ("job.shot_defaults", cfg_defaults)):
        for k, v in d.items():
            if k in NOT_DEFAULTABLE:
                problems.append(Problem("manifest", f"{origin}.{k}", f"{k} differs per shot: set it on each shot"))
            elif k not in SHOT_FIELDS:
                problems.append(Problem("manifest", f"{origin}.{k}", f"unknown field: {_suggest(k, SHOT_FIELDS)}"))
            elif (msg := _check_value(k, v, priorities)) is not None:
                problems.append(Problem("manifest", f"{origin}.{k}", msg))
            elif k == "prompt" and is_structured(v):
                try:
                    normalize_fields(v)
                except PromptError as e:
                    problems.append(Problem("manifest", f"{origin}.prompt.{e.field}", str(e)))

    def usable(d: dict) -> dict:
        return {k: v for k, v in d.items()
                if k in SHOT_FIELDS and k not in NOT_DEFAULTABLE and _check_value(k, v, priorities) is None}

    defaults, cli_values = usable(manifest_defaults), usable(cfg_defaults)

    entries = raw.get("shots")
    if not isinstance(entries, list) or not entries:
        problems.append(Problem("manifest", "shots", "no shots: add a `shots:` list with at least one "
                                                     "{id: ..., prompt: ...}"))
        entries = []
    shots: list[ShotRequest] = []
    seen_ids: dict[str, str] = {}
    seen_outputs: dict[str, str] = {}
    for index, entry in enumerate(entries):
        label = f"#{index + 1}"
        if isinstance(entry, dict) and "_row" in entry:
            label = f"row {entry['_row']}"
        if not isinstance(entry, dict):
            problems.append(Problem(label, "shot", f"a shot must be a mapping like {{id: sh010, prompt: ...}}, "
                                                   f"got {entry!r}"))
            continue
        entry = {k: v for k, v in entry.items() if v is not None}  # `seed:` left empty means unset
        entry.pop("_row", None)
        if entry.pop("_extra_cells", None):
            problems.append(Problem(label, "row", "the row has more cells than the header has columns: "
                                                  "add a column name or remove the cells"))
        shot_problems: list[Problem] = []
        sid = entry.get("id")
        if sid is None or sid == "":
            shot_problems.append(Problem(label, "id", "missing: give every shot a unique id like sh010"))
        elif (msg := _name_problem(sid, "id")) is not None:
            shot_problems.append(Problem(label, "id", msg))
        else:
            sid = str(sid)
            label = sid
            if sid in seen_ids:
                shot_problems.append(Problem(sid, "id", f"duplicate id (also {seen_ids[sid]}): ids must be unique"))
            seen_ids.setdefault(sid, f"shot #{index + 1}")
        for k in entry:
            if k not in SHOT_FIELDS:
                shot_problems.append(Problem(label, str(k), f"unknown field: {_suggest(k, SHOT_FIELDS)}"))
        bad_fields = set()
        for k in SHOT_FIELDS:
            if k in entry and k not in ("id", "output") and (msg := _check_value(k, entry[k], priorities)):
                shot_problems.append(Problem(label, k, msg))
                bad_fields.add(k)
        output = entry.get("output")
        if isinstance(output, str) and output.lower().endswith(".mp4"):
            output = output[:-4]
        if output is not None and (msg := _name_problem(output, "output")) is not None:
            shot_problems.append(Problem(label, "output", msg))
            output = None
        output = str(output if output is not None else (sid if sid is not None else label))
        if not any(p.field in ("id",) for p in shot_problems):
            key = output.lower()  # case-insensitive file systems (macOS, Windows) collide on case alone
            if key in seen_outputs and seen_outputs[key] != label:
                shot_problems.append(Problem(label, "output", f"{output}.mp4 is also written by shot "
                                                              f"{seen_outputs[key]}: give one of them another "
                                                              f"`output`"))
            seen_outputs.setdefault(key, label)

        # command line > shot > manifest defaults; tags add up instead
        values = {**{k: v for k, v in defaults.items() if k not in bad_fields}, **entry, **cli_values}
        values["tags"] = _plain_tags(_merge_tags(_merge_tags(defaults.get("tags"), entry.get("tags")),
                                                 cli_values.get("tags"))) or {}
        image = _resolve_path(values.get("image"), base_dir) if "image" not in bad_fields else None
        video = _resolve_path(values.get("video"), base_dir) if "video" not in bad_fields else None
        animate = values.get("task") in ("animate", "replace")
        if video and not Path(video).is_file() and not (animate and Path(video).is_dir()):
            shot_problems.append(Problem(label, "video", f"input video {values.get('video')} does not exist "
                                                         f"(looked in {video}): check the path"))
        plan = None
        if animate:  # the plate's and image's headers are read now: clip count and estimate, or the problems
            from renderer.prepare.shots import check_animate_shot

            plan, found = check_animate_shot(values["task"], video, image, _resolve_path(values.get("mask"), base_dir),
                                             values.get("refert_num", 1), steps=values.get("steps") or 20,
                                             guidance=values.get("guidance") or 1.0)
            shot_problems += [Problem(label, f, m) for f, m in found if f not in bad_fields]
            if "loras" not in bad_fields:  # files checked now, paths made absolute (jobs/animate_shots.py)
                from jobs.animate_shots import folder_problems, lora_problems

                values["loras"], found = lora_problems(values.get("loras"), preset.checkpoint, base_dir)
                shot_problems += [Problem(label, f, m) for f, m in found + folder_problems(video)]
        priority = values.get("priority", 0)
        priority = priorities.get(priority, priority) if isinstance(priority, str) else priority
        # the model's checks run even when other fields are wrong (every problem at once); a field already
        # reported as the wrong type falls back to the preset's default here, so it is not reported twice
        values = {k: v for k, v in values.items() if k not in bad_fields}
        n_before = len(shot_problems)
        prompt_text, prompt_fields = ("", None) if "prompt" in bad_fields else _compose_prompt(
            entry.get("prompt"), defaults.get("prompt"), label, shot_problems)
        if len(shot_problems) > n_before:
            bad_fields.add("prompt")  # reported with its field; not again as "the prompt is empty"
        g = values.get("guidance")
        spec = ShotSpec(prompt=prompt_text, task=values.get("task"),
                        negative_prompt=values.get("negative_prompt"), image=image,
                        size=None if values.get("size") is None else str(values["size"]),
                        frames=values.get("frames"), steps=values.get("steps"), seed=int(values.get("seed", 0)),
                        guidance=(g[0] if len(g) == 1 else tuple(g)) if isinstance(g, (list, tuple)) else g,
                        sampler=values.get("sampler") or "unipc", shift=values.get("shift"),
                        shot_id=str(sid) if sid is not None else label)
        shot_problems += [p for p in _model_problems(spec, preset, label, values) if p.field not in bad_fields]
        if not shot_problems:
            shots.append(ShotRequest(id=str(sid), output=output, spec=spec, priority=int(priority), index=index,
                                     tags=values["tags"], video=video,
                                     mask=_resolve_path(values.get("mask"), base_dir),
                                     refert_num=values.get("refert_num"), loras=values.get("loras"), clip_plan=plan,
                                     quality=values.get("quality") or "exact",
                                     prompt_fields=prompt_fields, label=bool(values.get("label", False))))
        problems += shot_problems
    if problems:
        raise ManifestError(problems, source)
    return Manifest(source=source, name=str(raw.get("name") or Path(source).stem), model=raw.get("model"),
                    shots=shots, defaults={**defaults, **cli_values},
                    overrides=_override_lines(manifest_defaults, entries, cli_values))


def _compose_prompt(shot_prompt: Any, default_prompt: Any, label: str,
                    problems: list[Problem]) -> tuple[str, dict | None]:
    """The shot's prompt text and its structured fields (renderer/prompts.py); a bad field becomes a Problem."""
    if shot_prompt is None and not is_structured(default_prompt):
        shot_prompt = default_prompt  # a plain-text default prompt, as before
    try:
        return resolve_prompt(shot_prompt, default_prompt)
    except PromptError as e:
        problems.append(Problem(label, f"prompt.{e.field}", str(e)))
        return "", None


def _model_problems(spec: ShotSpec, preset: ModelPreset, label: str, values: dict) -> list[Problem]:
    """What the chosen model cannot do with this shot (renderer.presets.check_shot is the single source)."""
    try:
        s = spec.resolve(preset)
    except (TypeError, ValueError) as e:
        return [Problem(label, "guidance", f"{e}: use a number or [low_noise, high_noise]")]
    out = []
    for fld, msg in check_shot(preset, s.task, s.size, s.frames, s.steps, s.prompt, s.image,
                               guidance=s.guidance, shift=s.shift):
        if fld == "image" and values.get("image") and "does not exist" in msg:
            msg = f"input image {values['image']} does not exist (looked in {s.image}): check the path"
        out.append(Problem(label, fld, msg))
    if spec.image and s.task == "t2v":
        out.append(Problem(label, "image", f"task t2v ignores the image; model {preset.name} does "
                                           f"{', '.join(preset.tasks)}: remove `image` or use an i2v/ti2v model"))
    return out


def load_manifest(path: str | Path, preset: ModelPreset, *, config_defaults: dict | None = None,
                  priorities: dict[str, int] | None = None) -> Manifest:
    """read_manifest + validate_manifest, paths relative to the manifest's folder."""
    p = Path(path)
    raw = read_manifest(p)
    return validate_manifest(raw, preset, base_dir=p.resolve().parent, config_defaults=config_defaults,
                             priorities=priorities, source=str(p))
