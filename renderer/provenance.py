"""Which code produced a result: the git commit, whether the files differed from it, and a digest of the source.

Every result wanrender writes (sidecars, benchmark JSON, the launch check's JSON line) carries `code_version()`
and, where there is room, `provenance()`.

Where the checkout's .git is present, git answers. The GPU machines receive only the working tree (no .git):
there the answer comes from SOURCE_STAMP.json, which `python -m renderer.provenance stamp` (`make stamp`) writes
next to setup.py before the tree is sent. A stamp is believed only while the source digest it recorded equals the
digest of the files present; a file edited after stamping makes the version say `.modified`. Without git and
without a stamp the version still names the source digest, so two results can be told apart or matched.

The digest: sha256 over the relative paths and bytes of the source files (renderer/, kernels/, jobs/,
benchmarks/ Python and shell files, conf/ YAML, setup.py), in sorted order — the same rule on every machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from renderer import __version__

ROOT = Path(__file__).resolve().parents[1]
STAMP_NAME = "SOURCE_STAMP.json"
_SOURCES = {"renderer": (".py",), "kernels": (".py",), "jobs": (".py",), "benchmarks": (".py", ".sh"),
            "conf": (".yaml",)}


def source_files(root: Path = ROOT) -> list[Path]:
    files = [root / "setup.py"] if (root / "setup.py").exists() else []
    for folder, suffixes in _SOURCES.items():
        for path in (root / folder).rglob("*"):
            if path.suffix in suffixes and path.is_file() and "__pycache__" not in path.parts:
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def source_digest(root: Path = ROOT) -> str:
    """16 hex digits identifying the source files' contents (see the module docstring for which files)."""
    h = hashlib.sha256()
    for path in source_files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(root: Path, *args: str) -> str | None:
    if not (root / ".git").exists():  # a worktree has a .git file, a clone a folder; the GPU machines neither
        return None
    try:
        run = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def provenance(root: Path = ROOT) -> dict:
    """{version, commit (40 hex or None), dirty (bool or None), source ("git" | "stamp" | "none"), digest,
    stamp_matches (stamp only)}. dirty: tracked files differ from the commit (git), or the stamp was taken from
    a dirty tree or the files changed since (stamp)."""
    digest = source_digest(root)
    commit = _git(root, "rev-parse", "HEAD")
    git_dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no")) if commit else None
    stamp_path = root / STAMP_NAME
    if commit and not git_dirty:
        return {"version": __version__, "commit": commit, "dirty": False, "source": "git", "digest": digest}
    # a dirty .git can be a stale copy that travelled with the tree (seen on the lent GPU machines: the session's
    # first commit, "dirty"): the stamp, taken just before the tree was sent, names the commit better — as it is
    # when its digest matches these very files, `.modified` when a file changed after stamping (the digest is kept,
    # so the exact files can still be matched to a commit afterwards). A stamp left over from an earlier commit of
    # this very history (an ancestor of HEAD: a developer's checkout with uncommitted edits) is older than git's
    # answer, which then stands.
    if commit and stamp_path.exists():
        try:
            stamp = json.loads(stamp_path.read_text())
            matches = stamp["digest"] == digest
            if not matches and _git(root, "merge-base", "--is-ancestor", stamp["commit"], "HEAD") is not None:
                raise ValueError("an older stamp")
            return {"version": __version__, "commit": stamp["commit"], "dirty": bool(stamp["dirty"]) or not matches,
                    "source": "stamp", "digest": digest, "stamp_matches": matches,
                    "stamped_at": stamp.get("stamped_at"), "git_commit": commit}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if commit:
        return {"version": __version__, "commit": commit, "dirty": True, "source": "git", "digest": digest}
    if stamp_path.exists():
        try:
            stamp = json.loads(stamp_path.read_text())
            matches = stamp["digest"] == digest
            return {"version": __version__, "commit": stamp["commit"], "dirty": bool(stamp["dirty"]) or not matches,
                    "source": "stamp", "digest": digest, "stamp_matches": matches,
                    "stamped_at": stamp.get("stamped_at")}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable stamp is no evidence: fall through
    return {"version": __version__, "commit": None, "dirty": None, "source": "none", "digest": digest}


def code_version(root: Path = ROOT) -> str:
    """`0.1.0+g<commit 12>` with `.dirty` (tracked files differ from the commit), `.modified` (files changed
    after the stamp), or `0.1.0+src.<digest>` when neither git nor a stamp says which commit this is."""
    p = provenance(root)
    if p["commit"] is None:
        return f"{__version__}+src.{p['digest']}"
    suffix = ".modified" if p.get("stamp_matches") is False else ".dirty" if p["dirty"] else ""
    return f"{__version__}+g{p['commit'][:12]}{suffix}"


def stamp(root: Path = ROOT) -> Path:
    """Record the commit, the dirty flag and the source digest in SOURCE_STAMP.json (needs git)."""
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        raise SystemExit(f"no git checkout at {root}: nothing to stamp (run this where the .git is)")
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    record = {"commit": commit, "dirty": dirty, "digest": source_digest(root),
              "stamped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = root / STAMP_NAME
    tmp = path.with_name(f".{STAMP_NAME}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m renderer.provenance", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("stamp", "show"),
                    help="stamp: write SOURCE_STAMP.json before sending the tree to a machine without .git; "
                         "show: print what a result written here would record")
    ap.add_argument("--root", default=str(ROOT))
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if args.command == "stamp":
        path = stamp(root)
        print(f"wrote {path}: {code_version(root)}")
    else:
        print(json.dumps({"code_version": code_version(root), **provenance(root)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
