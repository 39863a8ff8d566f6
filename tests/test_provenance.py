"""renderer.provenance: the commit a result names, with git, from a stamp on a machine without .git, and neither.

Each test builds a small source tree in tmp_path (setup.py, renderer/, conf/) with its own git repository, so the
answers do not depend on the state of this checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from renderer import __version__
from renderer.provenance import STAMP_NAME, code_version, provenance, source_digest, stamp

ROOT = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "src"
    (root / "renderer").mkdir(parents=True)
    (root / "conf").mkdir()
    (root / "setup.py").write_text("# setup\n")
    (root / "renderer" / "a.py").write_text("A = 1\n")
    (root / "conf" / "c.yaml").write_text("x: 1\n")
    (root / "notes.txt").write_text("not source\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-qm", "first")
    return root


def test_git_checkout(tree):
    sha = _git(tree, "rev-parse", "HEAD")
    assert code_version(tree) == f"{__version__}+g{sha[:12]}"
    p = provenance(tree)
    assert p["commit"] == sha and p["dirty"] is False and p["source"] == "git"
    (tree / "renderer" / "a.py").write_text("A = 2\n")
    assert code_version(tree) == f"{__version__}+g{sha[:12]}.dirty"
    (tree / "renderer" / "new.py").write_text("B = 1\n")  # untracked files do not make the tree dirty
    _git(tree, "checkout", "renderer/a.py")
    assert provenance(tree)["dirty"] is False


def test_stamp_travels_without_git(tree, tmp_path):
    sha = _git(tree, "rev-parse", "HEAD")
    path = stamp(tree)
    assert json.loads(path.read_text())["commit"] == sha
    sent = tmp_path / "sent"  # what the GPU machine gets: the working tree and the stamp, no .git
    shutil.copytree(tree, sent, ignore=shutil.ignore_patterns(".git"))
    p = provenance(sent)
    assert p["source"] == "stamp" and p["commit"] == sha and p["stamp_matches"] and p["dirty"] is False
    assert code_version(sent) == f"{__version__}+g{sha[:12]}"
    (sent / "notes.txt").write_text("changed, but not source\n")
    assert code_version(sent) == f"{__version__}+g{sha[:12]}"
    (sent / "renderer" / "a.py").write_text("A = 3\n")  # edited after the stamp: the stamp no longer vouches
    assert code_version(sent) == f"{__version__}+g{sha[:12]}.modified"
    assert provenance(sent)["dirty"] is True


def test_stamp_of_a_dirty_tree_says_so(tree, tmp_path):
    (tree / "renderer" / "a.py").write_text("A = 5\n")
    stamp(tree)
    sent = tmp_path / "sent"
    shutil.copytree(tree, sent, ignore=shutil.ignore_patterns(".git"))
    assert code_version(sent).endswith(".dirty")


def test_no_git_no_stamp_names_the_digest(tree, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tree, bare, ignore=shutil.ignore_patterns(".git"))
    assert code_version(bare) == f"{__version__}+src.{source_digest(bare)}"
    before = source_digest(bare)
    (bare / "conf" / "c.yaml").write_text("x: 2\n")
    assert source_digest(bare) != before
    (bare / STAMP_NAME).write_text("{not json")  # an unreadable stamp is no evidence
    assert provenance(bare)["source"] == "none"


def test_stamp_needs_git(tmp_path):
    (tmp_path / "setup.py").write_text("")
    with pytest.raises(SystemExit, match="no git checkout"):
        stamp(tmp_path)


def test_cli_show_and_stamp(tree):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "renderer.provenance", "stamp", "--root", str(tree)], env=env,
                         capture_output=True, text=True, check=True)
    assert (tree / STAMP_NAME).exists() and "+g" in run.stdout
    shown = subprocess.run([sys.executable, "-m", "renderer.provenance", "show", "--root", str(tree)], env=env,
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["commit"] == _git(tree, "rev-parse", "HEAD")


def test_a_stale_dirty_git_yields_to_a_matching_stamp(tree):
    """The lent GPU machines get the tree with a stale .git (an older commit): git reports that commit, dirty.
    A stamp names the commit that was sent: as is when its digest equals these files, `.modified` when not."""
    old = _git(tree, "rev-parse", "HEAD")
    (tree / "renderer" / "a.py").write_text("A = 2\n")
    _git(tree, "commit", "-qam", "second")
    new = _git(tree, "rev-parse", "HEAD")
    stamp(tree)  # taken at the new commit, clean
    _git(tree, "reset", "-q", "--soft", old)  # .git now says `old`, and the files differ from it (dirty)
    p = provenance(tree)
    assert p["source"] == "stamp" and p["commit"] == new and p["dirty"] is False and p["git_commit"] == old
    assert code_version(tree) == f"{__version__}+g{new[:12]}"
    (tree / "renderer" / "a.py").write_text("A = 3\n")  # edited after the stamp: the stamp's commit, modified
    p = provenance(tree)
    assert p["source"] == "stamp" and p["commit"] == new and p["dirty"] is True and p["stamp_matches"] is False
    assert p["git_commit"] == old and p["digest"] == source_digest(tree)
    assert code_version(tree) == f"{__version__}+g{new[:12]}.modified"
    _git(tree, "reset", "-q", "--soft", new)  # a stamp of an ancestor of HEAD with files edited since: git answers
    _git(tree, "commit", "-qam", "third")
    (tree / "renderer" / "a.py").write_text("A = 4\n")
    third = _git(tree, "rev-parse", "HEAD")
    p = provenance(tree)
    assert p["source"] == "git" and p["commit"] == third and p["dirty"] is True
    (tree / STAMP_NAME).write_text("{not json")  # an unreadable stamp is no evidence: git's dirty answer stands
    p = provenance(tree)
    assert p["source"] == "git" and p["commit"] == third and p["dirty"] is True
