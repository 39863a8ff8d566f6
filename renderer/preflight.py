"""Checks that run before anything is loaded or reserved: the checkpoint folder and the output folder.

Both `wanrender generate` and the farm's dry run / job start call these, so a wrong folder is reported in seconds
with the field to fix (model.checkpoint=, out=), not after render groups have loaded a text encoder and failed.

The checkpoint check reads no tensor: the experts from config.json, the index and the safetensors headers
(renderer.checkpoint.check_dit_folder); the official .pth files (UMT5, VAE) from their zip directory and a
memory-mapped, weights_only load whose tensors are never touched (only their names), so even the 11 GB UMT5 file
costs a few milliseconds and an untrusted pickle is never executed.
"""
from __future__ import annotations

import errno
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

# H.264 at crf 18 stays well under this for rendered footage (measured ~0.05-0.15 B/pixel); the margin covers
# noisy content. Per shot on top: sidecar, logs, the temp file's headroom and the report's thumbnails.
BYTES_PER_PIXEL = 0.3
BYTES_PER_SHOT = 64 * 1024


def _t5_keys(sd: dict) -> str | None:
    from renderer.encoders.text import official_to_hf_key

    unknown = sorted(k for k in sd if official_to_hf_key(k) is None)
    if unknown:
        return f"{len(unknown)} key(s) that are not the official UMT5 encoder's: {', '.join(unknown[:5])}"
    return None


def _vae_keys(version: str):
    def check(sd: dict) -> str | None:
        enc = sd.get("encoder.conv1.weight")
        if enc is None or "decoder.conv1.weight" not in sd:
            return "no encoder.conv1 / decoder.conv1 weights: not a Wan VAE"
        found = "2.2" if enc.shape[1] == 12 else "2.1"  # shapes come from the metadata; no data is read
        return None if found == version else f"a Wan{found} VAE, the model needs Wan{version}"
    return check


def _pth_problem(path: Path, what: str, keys_check=None) -> str | None:
    """None when `path` is a torch.save zip whose pickle loads with weights_only=True into a dict of tensors."""
    if not path.is_file():
        return f"{what} {path.name} is missing from {path.parent}"
    if not zipfile.is_zipfile(path):
        return (f"{what} {path} is not a PyTorch checkpoint (no torch.save zip archive inside): the file is "
                f"truncated or something else under that name; copy it again")
    import pickle

    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk, unread
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        # never torch's own text: it suggests weights_only=False, which would run whatever the file holds
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return (f"{what} {path} is not a plain PyTorch state dict (refused by the safe loader: {first}); it is "
                f"corrupt or not a Wan2.2 file: copy it again")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        return f"{what} {path} holds a {type(sd).__name__}, not a state dict of tensors: copy the right file"
    wrong = keys_check(sd) if keys_check else None
    return f"{what} {path} holds {wrong}: copy the right file" if wrong else None


def _safetensors_folder_problem(folder: Path, what: str) -> str | None:
    from renderer.checkpoint import CheckpointError, _read_headers, _shard_files

    if not (folder / "config.json").is_file():
        return f"{what} folder {folder} is missing or has no config.json"
    try:
        if not _read_headers(_shard_files(folder)):
            return f"{what} folder {folder} holds no tensors"
    except CheckpointError as e:
        if "no .safetensors" in str(e) and list(folder.glob("*.bin")):
            return None  # older saves: pytorch_model.bin (read with weights_only=True at load time)
        return f"{what}: {e}"
    return None


def check_checkpoint(preset, root: str | Path) -> list[str]:
    """Every problem with a checkpoint folder for `preset`, each naming the path; [] when it can be loaded."""
    from renderer.checkpoint import CheckpointError, check_dit_folder, expert_folders
    from renderer.encoders.text import OFFICIAL_T5_FILE, OFFICIAL_TOKENIZER_DIR

    root = Path(root)
    if not root.is_dir():
        return [f"checkpoint folder {root} does not exist: point model.checkpoint at a Wan2.2 folder"]
    try:
        layout, folders = expert_folders(root, preset.experts)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    d = preset.dit
    for folder in folders:
        try:
            cfg, _ = check_dit_folder(folder, layout)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        differ = [f"{k} {getattr(cfg, k)} (model {preset.name}: {getattr(d, k)})"
                  for k in ("dim", "num_layers", "num_heads", "ffn_dim", "in_dim", "out_dim", "text_dim")
                  if getattr(cfg, k) != getattr(d, k)]
        if differ:
            problems.append(f"checkpoint {folder} holds another model than {preset.name}: {', '.join(differ)}; "
                            f"choose the matching model= or model.checkpoint=")
    if layout == "diffusers":
        for sub, what in (("text_encoder", "text encoder"), ("vae", "VAE")):
            if (p := _safetensors_folder_problem(root / sub, what)) is not None:
                problems.append(p)
        if not (root / "tokenizer").is_dir():
            problems.append(f"tokenizer folder {root / 'tokenizer'} is missing")
    else:
        v = preset.vae.version
        for path, what, keys in ((root / OFFICIAL_T5_FILE, "text encoder", _t5_keys),
                                 (root / f"Wan{v}_VAE.pth", f"Wan{v} VAE", _vae_keys(v))):
            if (p := _pth_problem(path, what, keys)) is not None:
                problems.append(p)
        if not (root / OFFICIAL_TOKENIZER_DIR).is_dir():
            problems.append(f"tokenizer folder {root / OFFICIAL_TOKENIZER_DIR} is missing")
    return problems


def estimate_output_bytes(shots: Iterable[tuple[int, int, int]]) -> int:
    """Bytes a job writes for shots given as (width, height, frames): MP4s, sidecars, logs, report thumbnails."""
    return int(sum(w * h * f * BYTES_PER_PIXEL + BYTES_PER_SHOT for w, h, f in shots))


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_output(out: str | Path, need_bytes: int = 0, create: bool = False) -> list[str]:
    """Problems writing `need_bytes` into the folder `out`: exists as a file, not writable (read-only mount,
    permissions), or too little free space. create=False (the dry run) leaves no trace: the write probe goes to
    the nearest existing parent and is deleted at once; create=True makes the folder and probes inside it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return [f"output folder {out} is a file: choose another out="]
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
        where = out if out.is_dir() else _existing_ancestor(out)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".wanrender-probe-"):
            pass
    except OSError as e:
        why = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full"}.get(e.errno, e.strerror or str(e))
        return [f"output folder {out} is not writable ({why}): choose another out= or make it writable"]
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        return [f"output folder {out} has no room for this job: about {_human(need_bytes)} needed, "
                f"{_human(free)} free on {where}: free space there or choose another out="]
    return []


def is_environment_error(e: BaseException) -> bool:
    """A fault of the machine, not of the shot: disk full, read-only, no permission, a missing binary or Python
    package (seen on a lent GPU machine without decord: every retry on every group failed the same way)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM):
        return True
    if isinstance(e, ImportError):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "Read-only file system", "Disk quota exceeded",
                                   "no ffmpeg binary found", "No module named"))
