"""Loading Wan2.2 DiT checkpoints from the two layouts studios keep on disk.

Official Wan-AI layout (what the Wan-AI release ships):
    <root>/high_noise_model/{config.json, diffusion_pytorch_model-0000N-of-0000M.safetensors, *.index.json}
    <root>/low_noise_model/...                       (A14B: two experts)
    <root>/{config.json, *.safetensors, *.index.json} (ti2v-5B: the model at the root)
diffusers layout:
    <root>/transformer/    the high-noise expert (or the only model)
    <root>/transformer_2/  the low-noise expert (A14B)

Our module names are the official key names, so only the diffusers names are mapped
(renderer/families/wan22/keys.py).

The model is built on the meta device and every tensor is read straight from its shard into its final dtype and
device, then assigned: a 14B expert never exists twice in memory. The keys and shapes in the shard headers are
checked against the model before a single tensor is read, so a wrong folder fails fast with one clear error.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

from renderer.families import get_family

class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the folder and what is wrong."""


# ----------------------------------------------------------------------------------------------------------
# finding the experts


def expert_folders(root: str | Path, expert_names: Iterable[str | None]) -> tuple[str, list[Path]]:
    """Where each expert of a model lives under `root`, and which layout it is.

    expert_names come from the model preset: ["high_noise_model", "low_noise_model"] for A14B, [None] for a
    model at the root (ti2v-5B). Returns ("official" | "diffusers", [folder per expert, preset order]).
    """
    root = Path(root)
    names = list(expert_names)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist: set model.checkpoint to a Wan2.2 folder")
    if (root / "transformer").is_dir():
        diff = [root / "transformer", root / "transformer_2"][: len(names)]
        missing = [str(p) for p in diff if not p.is_dir()]
        if missing:
            raise CheckpointError(f"checkpoint {root} (diffusers layout) lacks {', '.join(missing)}: "
                                  f"this model needs {len(names)} transformer folder(s)")
        return "diffusers", diff
    folders = [root / n if n else root for n in names]
    missing = [str(p) for p in folders if not (p / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {root} is neither an official Wan-AI folder nor a diffusers folder: no config.json in "
            f"{', '.join(missing)} and no transformer/ subfolder. Expected "
            + (" and ".join(f"{n}/" for n in names if n) or "config.json and *.safetensors at the root"))
    return "official", folders


def _shard_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"checkpoint {folder}: index {indexes[0].name} is unreadable ({e})") from e
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {folder}: shards named in {indexes[0].name} are missing: "
                                  f"{', '.join(missing[:5])} ({len(missing)} in all)")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {folder} has no .safetensors files")
    return files


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (shard, shape), from the safetensors headers alone (no tensor data is read)."""
    from safetensors import safe_open

    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    where[k] = (f, tuple(h.get_slice(k).get_shape()))
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(
                f"checkpoint shard {f} cannot be read ({e}); it is truncated or corrupt: copy it again") from e
    return where


def _describe(keys: list[str], what: str) -> str:
    head = ", ".join(keys[:5]) + (", …" if len(keys) > 5 else "")
    return f"  {what} ({len(keys)}): {head}"


def check_dit_folder(folder: str | Path, layout: str | None = None, family: str = "wan22"):
    """(config, {our key: (checkpoint key, shard, shape)}) of one expert folder, checked against the model its
    config.json describes, from config.json, the index and the safetensors headers alone: no tensor is read (the
    dry run and `generate` call it before anything loads). Raises CheckpointError naming the folder, the missing
    and unexpected keys and any shape mismatch."""
    spec = get_family(family)
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no config.json")
    try:
        raw_cfg = json.loads(cfg_path.read_text())
        layout = layout or ("diffusers" if "num_attention_heads" in raw_cfg else "official")
        cfg = spec.config_from_dict(raw_cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {cfg_path} is not a {family} transformer config ({e}): copy it again") from e
    with torch.device("meta"):
        model = spec.model_cls(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    to_ours = spec.key_maps.get(layout) or (lambda k: k)  # official keys are our module names
    headers = _read_headers(_shard_files(folder))
    ours = {to_ours(k): (k, f, shape) for k, (f, shape) in headers.items()}
    missing = sorted(k for k in expected if k not in ours)
    unexpected = sorted(ours[k][0] for k in ours if k not in expected)
    mismatched = sorted(f"{ours[k][0]}: checkpoint {list(ours[k][2])} vs model {list(shape)}"
                        for k, shape in expected.items() if k in ours and ours[k][2] != shape)
    if missing or unexpected or mismatched:
        raise mismatch_error(f"checkpoint {folder} ({layout} layout) does not match its config.json "
                             f"(dim {cfg.dim}, {cfg.num_layers} layers, in {cfg.in_dim} / out {cfg.out_dim} channels):",
                             missing, unexpected, mismatched,
                             "Check that this folder is a Wan2.2 transformer of the model preset you chose, "
                             "and that every shard was copied completely.")
    return cfg, ours


def mismatch_error(headline: str, missing: list[str], unexpected: list[str], mismatched: list[str],
                   advice: str) -> CheckpointError:
    """One error for a folder whose keys or shapes do not match the model: the headline, the first few of each
    list with counts, and what to check — raised before any tensor is read."""
    lines = [headline]
    if missing:
        lines.append(_describe(missing, "missing keys"))
    if unexpected:
        lines.append(_describe(unexpected, "unexpected keys"))
    if mismatched:
        lines.append(_describe(mismatched, "shape mismatches"))
    lines.append(advice)
    return CheckpointError("\n".join(lines))


def load_dit(folder: str | Path, layout: str | None = None, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu", family: str = "wan22") -> torch.nn.Module:
    """Load one DiT (one expert) of `family` from an official or diffusers folder holding config.json +
    safetensors; the family's spec gives the config reader, the model class, the key map and the fp32 rule."""
    spec = get_family(family)
    from safetensors import safe_open

    cfg, ours = check_dit_folder(folder, layout, family)  # every key and shape checked before a tensor is read
    with torch.device("meta"):
        model = spec.model_cls(cfg)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (src, f, _) in ours.items():
        by_file.setdefault(f, []).append((name, src))
    dev = torch.device(device)
    for f, pairs in by_file.items():
        state = {}
        try:
            with safe_open(str(f), framework="pt", device=str(dev) if dev.type != "cpu" else "cpu") as h:
                for name, src in pairs:
                    want = torch.float32 if spec.keeps_fp32(name) else dtype
                    state[name] = h.get_tensor(src).to(want)
        except Exception as e:
            raise CheckpointError(f"checkpoint shard {f} cannot be read ({e}); it is truncated or corrupt: "
                                  f"copy it again") from e
        model.load_state_dict(state, strict=False, assign=True)
        del state
    return model.eval()


def load_experts(root: str | Path, expert_names: Iterable[str | None], dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", family: str = "wan22") -> list[torch.nn.Module]:
    """Every expert of a model, in preset order (A14B: high-noise first, then low-noise)."""
    layout, folders = expert_folders(root, expert_names)
    return [load_dit(f, layout, dtype, device, family) for f in folders]


def fingerprint(root: str | Path) -> str:
    """A cheap identity for a checkpoint folder: hash of relative names, sizes and the config/index files.

    Used in sidecars and the resume hash; hashing tens of GB of weights per render would cost minutes.
    """
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}:{p.stat().st_size};".encode())
            if p.suffix == ".json":
                h.update(p.read_bytes())
    return h.hexdigest()[:16]
