"""The content-safety gate: prompts are screened before any GPU is reserved, rendered frames before delivery.

Prompt screening: term lists per language in editable text files (conf/safety/terms_<lang>.txt, or the folder
`safety.terms_dir`). Latin-script lists match whole words, case-insensitively, with an optional plural s/es —
substring matching would block "grape" for "rape" and "Sussex" for "sex". Chinese, Japanese and Korean lists
match substrings: those languages put no spaces between words, so there is no boundary to match on, and a
segmenter would split unseen compounds unpredictably. Only the positive prompt is screened: the negative prompt
lists what the render must avoid, and "nudity" there is the safety practice, not a violation.

Output screening: frames sampled evenly through the clip (first and last included) go through a detector; the
default is NudeNet's 320n detector, whose ONNX model ships inside the nudenet wheel and runs on onnxruntime's
CPU provider — offline, no download. A detection of a flagged class at or above `safety.threshold` holds the
shot: it is written to <out>/quarantine/ instead of <out>/, marked in the sidecar and the report with the class,
score and frame, and leaves only through `wanrender release` (jobs/safety.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_TERMS_DIR = Path(__file__).resolve().parents[1] / "conf" / "safety"
SUBSTRING_LANGUAGES = ("zh", "ja", "ko")  # scripts without spaces between words
# NudeNet classes that hold a shot; covered parts, faces and feet do not
FLAGGED_CLASSES = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
                   "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
QUARANTINE_DIR = "quarantine"

Detection = dict  # {"class": str, "score": float, "box": [x, y, w, h]}
Detector = Callable[[np.ndarray], list]  # one [H,W,3] uint8 RGB frame -> detections


@dataclass(frozen=True)
class SafetySettings:
    prompt_screen: bool = True
    terms_dir: str | None = None  # None: conf/safety inside the package
    output_screen: bool = True
    detector: str = "nudenet"  # or "package.module:factory" returning a Detector (tests, another model)
    threshold: float = 0.5
    sample_frames: int = 4
    classes: tuple[str, ...] = FLAGGED_CLASSES

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SafetySettings":
        d = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__ and v is not None}
        if "classes" in d:
            d["classes"] = tuple(d["classes"])
        return cls(**d)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                or not 0 < float(self.threshold) <= 1):
            out.append(("safety.threshold", f"must be a score in (0, 1], got {self.threshold!r}"))
        if isinstance(self.sample_frames, bool) or not isinstance(self.sample_frames, int) or self.sample_frames < 1:
            out.append(("safety.sample_frames", f"must be a whole number >= 1, got {self.sample_frames!r}"))
        if self.prompt_screen:
            try:
                load_terms(self.terms_dir)
            except ValueError as e:
                out.append(("safety.terms_dir", str(e)))
        if self.output_screen:
            module = "nudenet" if self.detector == "nudenet" else self.detector.partition(":")[0]
            if self.detector != "nudenet" and ":" not in self.detector:
                out.append(("safety.detector", f"{self.detector!r}: use nudenet or package.module:factory"))
            elif importlib.util.find_spec(module) is None:
                out.append(("safety.detector", f"module {module} is not installed: pip install nudenet (a "
                                               f"dependency of wanrender), or set safety.output_screen=false"))
        return out


# -- prompt screening -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TermList:
    language: str
    path: Path
    terms: tuple[str, ...]
    patterns: tuple = field(default=(), compare=False)  # one compiled whole-word pattern per term (Latin scripts)

    def find(self, text: str) -> list[str]:
        """The listed terms (as written in the list) that occur in `text`."""
        if self.language in SUBSTRING_LANGUAGES:
            return [t for t in self.terms if t in text]
        return [t for t, p in zip(self.terms, self.patterns) if p.search(text)]


def _word_pattern(term: str) -> re.Pattern:
    words = r"\s+".join(re.escape(w) for w in term.split())  # any spacing between a phrase's words
    return re.compile(r"(?<!\w)" + words + r"(?:e?s)?(?!\w)", re.IGNORECASE)


def load_terms(terms_dir: str | Path | None = None) -> list[TermList]:
    """Every terms_<lang>.txt in the folder; ValueError naming the folder when there is none."""
    folder = Path(terms_dir) if terms_dir else DEFAULT_TERMS_DIR
    files = sorted(folder.glob("terms_*.txt")) if folder.is_dir() else []
    if not files:
        raise ValueError(f"no term lists (terms_<lang>.txt) in {folder}: point safety.terms_dir at the folder "
                         f"holding them, or set safety.prompt_screen=false")
    lists = []
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        terms = tuple(dict.fromkeys(t for t in (line.split("#", 1)[0].strip() for line in lines) if t))
        lang = path.stem[len("terms_"):].lower()
        patterns = () if lang in SUBSTRING_LANGUAGES else tuple(_word_pattern(t) for t in terms)
        lists.append(TermList(lang, path, terms, patterns))
    return lists


@dataclass(frozen=True)
class TermMatch:
    term: str
    language: str
    list_path: str

    def message(self) -> str:
        return (f"blocked by the content-safety gate: matches {self.term!r} from the {self.language} term list "
                f"({self.list_path}); rephrase the prompt, or ask the safety lead to change that list")


def screen_prompt(text: str, lists: list[TermList]) -> list[TermMatch]:
    """Every listed term the prompt contains (empty: the prompt passes)."""
    return [TermMatch(t, tl.language, str(tl.path)) for tl in lists for t in tl.find(text or "")]


def prompt_screen_record(prompt: str, settings: SafetySettings) -> dict[str, Any] | None:
    """What the sidecar keeps about the prompt screen: which lists (file and SHA-256) and the result."""
    import hashlib

    if not settings.prompt_screen:
        return None
    lists = load_terms(settings.terms_dir)
    matches = screen_prompt(prompt, lists)
    return {"passed": not matches, "matched": [m.term for m in matches],
            "lists": {tl.language: {"path": str(tl.path), "sha256": hashlib.sha256(tl.path.read_bytes()).hexdigest()}
                      for tl in lists}}


# -- output screening -------------------------------------------------------------------------------------------
class NudeNetDetector:
    """NudeNet's detector from the ONNX model inside its wheel (onnxruntime, CPU)."""

    def __init__(self, threads: int = 1):
        import os

        import nudenet
        import onnxruntime
        from nudenet import NudeDetector

        self.model = NudeDetector()
        # the same model file, on the CPU provider with one thread: it runs beside the renderer in the same process
        # (a render group's rank 0), where ONNX Runtime's default of one thread per core only contends with torch
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        model_file = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
        self.model.onnx_session = onnxruntime.InferenceSession(model_file, sess_options=opts,
                                                               providers=["CPUExecutionProvider"])
        self.name = "nudenet-320n"

    def __call__(self, frame: np.ndarray) -> list:
        # NudeNet's preprocessing expects OpenCV's BGR channel order (it reads files with cv2.imread)
        return self.model.detect(np.ascontiguousarray(frame[..., ::-1]))  # [H, W, 3] BGR


def load_detector(spec: str) -> Detector:
    """'nudenet' or 'package.module:factory' (a callable returning a Detector)."""
    if spec == "nudenet":
        return NudeNetDetector()
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"safety.detector {spec!r}: use nudenet or package.module:factory")
    return getattr(importlib.import_module(module), attr)()


def sample_indices(n_frames: int, n_samples: int) -> list[int]:
    """Evenly spaced frame indices, first and last included."""
    if n_frames <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, min(n_samples, n_frames))})


@dataclass
class OutputScreen:
    """Screens a rendered clip's frames. Build once per process: loading the detector is the slow part."""

    settings: SafetySettings
    detector: Detector

    @classmethod
    def from_settings(cls, settings: SafetySettings) -> "OutputScreen | None":
        if not settings.output_screen:
            return None
        return cls(settings, load_detector(settings.detector))

    def check(self, frames: np.ndarray) -> dict[str, Any]:
        """[F,H,W,3] uint8 RGB -> verdict (plain JSON): held or not, and why, with the highest flagged score."""
        idx = sample_indices(len(frames), self.settings.sample_frames)
        worst, top_any = None, 0.0
        for i in idx:
            for d in self.detector(frames[i]):
                score = float(d["score"])
                top_any = max(top_any, score)
                if d["class"] in self.settings.classes and (worst is None or score > worst["score"]):
                    worst = {"class": d["class"], "score": round(score, 4), "frame": i, "box": list(d.get("box", []))}
        held = worst is not None and worst["score"] >= self.settings.threshold
        name = getattr(self.detector, "name", self.settings.detector)
        return {"held": held, "detector": name, "threshold": self.settings.threshold, "frames_checked": idx,
                "reason": (f"{worst['class']} detected with score {worst['score']:.2f} >= {self.settings.threshold}"
                           f" on frame {worst['frame']}") if held else None,
                "score": worst["score"] if worst else 0.0, "detection": worst if held else None}


def image_problem(path: str, screen: "OutputScreen") -> str | None:
    """The detector's verdict on a conditioning image (i2v / ti2v input) before any GPU; None when it passes or
    the file is not readable (the shot checks report that)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            frame = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))  # [H, W, 3] uint8
    except (OSError, ValueError):
        return None
    verdict = screen.check(frame[None])
    if not verdict["held"]:
        return None
    return (f"input image {path} blocked by the content-safety gate: {verdict['reason']}; use another image, or "
            f"set safety.output_screen=false only with the safety lead's approval")


def held_sidecar(out_dir: str | Path, output: str) -> dict[str, Any] | None:
    """The quarantined sidecar of `output`, or None when it is not held."""
    from renderer.video_io import read_json

    side = Path(out_dir) / QUARANTINE_DIR / f"{output}.json"
    if not side.is_file() or not (side.with_suffix(".mp4")).is_file():
        return None
    try:
        return read_json(side)
    except (OSError, ValueError):
        return None
