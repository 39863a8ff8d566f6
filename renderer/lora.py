"""LoRA files in, applied to a DiT merged (into the weights) or unmerged (a low-rank side path).

Formats read (the key naming is detected per key, prefixes are stripped):
  * Wan2.2-Lightning / lightx2v / Kijai safetensors: `[diffusion_model.]<module>.lora_down.weight`,
    `.lora_up.weight`, `.alpha`, optionally `.diff` / `.diff_b` (full weight / bias deltas) — fp32 factors,
    ΔW = (alpha / rank)·up·down (ModelTC/Wan2.2-Lightning wan/utils/utils.py, load_and_merge_lora_weight);
  * PEFT state dicts (`<module>.lora_A[.<adapter>].weight`, `.lora_B...`), e.g. the official Animate
    relighting_lora.ckpt — a torch pickle holding {"state_dict": ...}, read with torch.load(weights_only=True);
    PEFT stores no alpha in the tensors (the official code passes r=128, lora_alpha=128), so `alpha` is an
    argument (default: alpha = rank, scale 1) or read from an adapter_config.json beside the file;
  * diffusers/PEFT naming of a WanTransformer3DModel (`transformer.blocks.0.attn1.to_q.lora_A.weight`), mapped onto
    the official names with renderer.families.wan22.keys.diffusers_to_official.
Module names after mapping are the official Wan keys, which are our module names.

Applying:
  * merged:   W ← W + Σ_i scale_i·(alpha_i/rank_i)·up_i·down_i, summed in fp32 and cast once to W's dtype —
              no cost per forward (the draft tier merges the Lightning LoRAs at load time);
  * unmerged: each targeted nn.Linear becomes a LoraLinear (same weight/bias parameters, so state-dict names do
              not change) computing x·Wᵀ + b + Σ_i s_i·(x·downᵢᵀ)·upᵢᵀ — the order of operations of the official
              PEFT path, so scales can change per render without reloading.
Which modules: every module a LoRA names must be one of the model's (factors: an nn.Linear; diff / diff_b / diff_m:
a parameter of the same shape). A module of the Wan backbone the model lacks (k_img on a T2V model, img_emb.emb_pos
of FLF2V) is skipped and listed in one warning line, as LightX2V and ComfyUI skip them; any other name — another
family's module, or a block index past the model's depth (another model size) — is an error naming the key.
Apply LoRAs before the model is parallelised (FSDP shards whatever weights it is given).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("wanrender.lora")

_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.diffusion_model.")
# (regex on the stripped key, the part it names) — adapter names of PEFT (lora_A.default.weight) are allowed
_PARTS = [
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[\w-]+)?\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[\w-]+)?\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
    (re.compile(r"^(?P<m>.+)\.diff$"), "diff"),
    (re.compile(r"^(?P<m>.+)\.diff_b$"), "diff_b"),
    (re.compile(r"^(?P<m>.+)\.diff_m$"), "diff_m"),
]
# module names of the official Wan2.1 / Wan2.2 DiTs (any variant): a LoRA naming one the model lacks is skipped
_WAN_BLOCK_PARTS = re.compile(r"^(self_attn\.(q|k|v|o|norm_q|norm_k)|cross_attn\.(q|k|v|o|norm_q|norm_k|k_img|v_img|"
                              r"norm_k_img)|norm1|norm2|norm3|ffn\.(0|2))$")
_WAN_TOP = re.compile(r"^(patch_embedding|text_embedding\.(0|2)|time_embedding\.(0|2)|time_projection\.1|head|head\.head|"
                      r"img_emb\.proj\.(0|1|3|4)|img_emb\.emb_pos)$")
_BLOCK = re.compile(r"^blocks\.(?P<i>\d+)(?:\.(?P<rest>.+))?$")
_DIFFUSERS_MARKERS = ("attn1.", "attn2.", "ffn.net.", "proj_out", "condition_embedder.", "scale_shift_table")


class LoraError(ValueError):
    """A LoRA file that does not fit the model; the message names the file, the keys and the fix."""


@dataclass
class LoraLayer:
    """One targeted module: ΔW = (alpha/rank)·up·down (+ diff), Δb = diff_b."""

    down: torch.Tensor | None = None  # [rank, in]
    up: torch.Tensor | None = None  # [out, rank]
    alpha: float | None = None  # None: alpha = rank (scale 1), as PEFT with lora_alpha = r
    diff: torch.Tensor | None = None  # [out, in]
    diff_b: torch.Tensor | None = None  # [out]
    diff_m: torch.Tensor | None = None  # [1, 6, dim]: the block's modulation table

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def factor(self) -> float:
        return 1.0 if self.alpha is None or not self.rank else float(self.alpha) / self.rank


@dataclass
class LoraWeights:
    """A LoRA file parsed onto our module names."""

    name: str
    layers: dict[str, LoraLayer] = field(default_factory=dict)

    def describe(self) -> dict:
        ranks = sorted({l.rank for l in self.layers.values() if l.rank})
        return {"name": self.name, "modules": len(self.layers), "ranks": ranks}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _module_name(raw: str) -> str:
    """A module name in any naming -> ours (the official Wan key without .weight)."""
    if any(m in raw for m in _DIFFUSERS_MARKERS):
        from renderer.families.wan22.keys import diffusers_to_official

        return diffusers_to_official(raw + ".weight")[: -len(".weight")]
    return raw


def parse_lora_state_dict(state: dict[str, torch.Tensor], name: str = "lora", alpha: float | None = None) -> LoraWeights:
    """Group the tensors of a LoRA state dict per module. `alpha` applies where the file stores none."""
    out = LoraWeights(name)
    unknown = []
    for key, value in state.items():
        stripped = _strip(key)
        for pattern, part in _PARTS:
            m = pattern.match(stripped)
            if m:
                layer = out.layers.setdefault(_module_name(m.group("m")), LoraLayer())
                if part == "alpha":
                    layer.alpha = float(value.item() if torch.is_tensor(value) else value)
                else:
                    setattr(layer, part, value)
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoraError(f"LoRA {name}: {len(unknown)} key(s) in no known LoRA format (first: {unknown[:3]}); "
                        f"expected <module>.lora_down/.lora_up/.alpha, <module>.lora_A/.lora_B or "
                        f".diff/.diff_b/.diff_m")
    for module, layer in out.layers.items():
        if (layer.down is None) != (layer.up is None):
            raise LoraError(f"LoRA {name}: module {module} has only one of its two factors (down/A and up/B)")
        if layer.down is not None:
            if layer.down.ndim != 2 or layer.up.ndim != 2 or layer.up.shape[1] != layer.down.shape[0]:
                raise LoraError(f"LoRA {name}: module {module}: rank mismatch, down {tuple(layer.down.shape)} and "
                                f"up {tuple(layer.up.shape)} (expected down [rank, in] and up [out, rank])")
            if layer.alpha is None and alpha is not None:
                layer.alpha = float(alpha)
    if not out.layers:
        raise LoraError(f"LoRA {name}: the file holds no LoRA tensors")
    return out


def load_lora(path: str | Path, alpha: float | None = None) -> LoraWeights:
    """Read a LoRA from .safetensors, or a torch checkpoint (.ckpt/.pt/.pth, weights_only=True, `state_dict`
    inside or at the top). A PEFT adapter_config.json beside the file gives lora_alpha when `alpha` is None."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist: check the path in the tier or the loras list")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file and the reason
            raise LoraError(f"LoRA file {path} cannot be read as a weights-only torch checkpoint: {e}") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise LoraError(f"LoRA file {path} holds a {type(state).__name__}, not a state dict")
    config = path.parent / "adapter_config.json"
    if alpha is None and config.is_file():
        alpha = json.loads(config.read_text()).get("lora_alpha")
    return parse_lora_state_dict(state, name=path.name, alpha=alpha)


# ----------------------------------------------------------------------------------------------------------
# applying


def _is_wan_module(name: str, modules: dict[str, nn.Module]) -> bool:
    """A module of the Wan backbone (any variant) that this model lacks, inside the model's depth."""
    m = _BLOCK.match(name)
    if m:
        if f"blocks.{m.group('i')}" not in modules:  # past the model's depth: a LoRA for another model size
            return False
        return m.group("rest") is not None and bool(_WAN_BLOCK_PARTS.match(m.group("rest")))
    return bool(_WAN_TOP.match(name))


def _param_problem(module: nn.Module, attr: str, delta: torch.Tensor | None) -> str | None:
    if delta is None:
        return None
    p = getattr(module, attr, None)
    if not isinstance(p, torch.Tensor):
        return f"has a {attr} delta but the layer ({type(module).__name__}) has no {attr}"
    if tuple(delta.shape) != tuple(p.shape):
        return f"{attr} delta {tuple(delta.shape)} != {attr} {tuple(p.shape)} (a LoRA for another model size?)"
    return None


def _targets(model: nn.Module, lora: LoraWeights) -> dict[str, nn.Module]:
    """{module name: module} of every module the LoRA touches that the model has. A Wan module the model lacks is
    skipped with one warning line; anything else that does not fit is a LoraError naming the key."""
    modules = dict(model.named_modules())
    unknown = [m for m in lora.layers if m not in modules and not _is_wan_module(m, modules)]
    if unknown:
        raise LoraError(f"LoRA {lora.name}: {len(unknown)} of {len(lora.layers)} modules match no linear layer or "
                        f"parameter of the model (first: {unknown[:4]}); is it a LoRA for another model family "
                        f"or size?")
    skipped = sorted(m for m in lora.layers if m not in modules)
    if skipped:
        log.warning("LoRA %s: %d module(s) this %s does not have, skipped: %s", lora.name, len(skipped),
                    type(model).__name__, ", ".join(skipped))
    found = {}
    for m, layer in lora.layers.items():
        if m in skipped:
            continue
        mod = modules[m]
        if layer.down is not None:
            if not isinstance(mod, nn.Linear):
                raise LoraError(f"LoRA {lora.name}: module {m}: low-rank factors for a {type(mod).__name__}, "
                                f"not a linear layer")
            out_f, in_f = mod.weight.shape
            if layer.down.shape[1] != in_f or layer.up.shape[0] != out_f:
                raise LoraError(f"LoRA {lora.name}: module {m}: factors give [{layer.up.shape[0]}, "
                                f"{layer.down.shape[1]}] but the layer is [{out_f}, {in_f}] (a LoRA for another "
                                f"model size?)")
        for attr, delta, key in (("weight", layer.diff, "diff"), ("bias", layer.diff_b, "diff_b"),
                                 ("modulation", layer.diff_m, "diff_m")):
            problem = _param_problem(mod, attr, delta)
            if problem:
                raise LoraError(f"LoRA {lora.name}: key {m}.{key}: {problem}")
        found[m] = mod
    return found


def merge_loras(model: nn.Module, loras: list[tuple[LoraWeights, float]]) -> nn.Module:
    """W += Σ scale·(alpha/rank)·up·down (+ the diff / diff_b / diff_m deltas), summed in fp32 and cast once to
    each parameter's dtype. One module at a time: the fp32 deltas of a 14B DiT held at once would take ~64 GB."""
    found = [(lora, scale, _targets(model, lora)) for lora, scale in loras]  # every check before any change
    targets: dict[str, nn.Module] = {}
    for _, _, f in found:
        targets.update(f)
    with torch.no_grad():
        for m, mod in targets.items():
            dev = next(mod.parameters()).device
            sums: dict[str, torch.Tensor] = {}  # parameter -> fp32 delta of this module, over all LoRAs
            for lora, scale, f in found:
                if m not in f:
                    continue
                layer = lora.layers[m]
                parts = [("weight", layer.diff), ("bias", layer.diff_b), ("modulation", layer.diff_m)]
                if layer.down is not None:
                    d = layer.up.to(dev, torch.float32) @ layer.down.to(dev, torch.float32)  # [out, in]
                    parts.append(("weight", d * layer.factor))
                for attr, delta in parts:
                    if delta is not None:
                        d = scale * delta.to(dev, torch.float32)
                        sums[attr] = sums[attr] + d if attr in sums else d
            for attr, d in sums.items():
                p = getattr(mod, attr)
                p.copy_((p.float() + d).to(p.dtype))
    log.info("merged %s into %d layers", ", ".join(f"{l.name}×{s:g}" for l, s in loras), len(targets))
    return model


class LoraLinear(nn.Linear):
    """nn.Linear plus unmerged low-rank paths: y = x·Wᵀ + b + Σ_i s_i·(x·downᵢᵀ)·upᵢᵀ.

    Shares the wrapped layer's weight and bias Parameters (state-dict names unchanged); the factors are
    non-persistent buffers in the weight's dtype, scale_i = user scale·alpha/rank."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_scales: list[float] = []
        self.lora_names: list[str] = []
        self.n_loras = 0

    def add(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        i = self.n_loras
        dt, dev = self.weight.dtype, self.weight.device
        self.register_buffer(f"lora_down_{i}", down.to(dev, dt), persistent=False)  # [rank, in]
        self.register_buffer(f"lora_up_{i}", up.to(dev, dt), persistent=False)  # [out, rank]
        self.lora_scales.append(float(scale))
        self.lora_names.append(name)
        self.n_loras += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        for i in range(self.n_loras):
            down, up = getattr(self, f"lora_down_{i}"), getattr(self, f"lora_up_{i}")
            y = y + self.lora_scales[i] * F.linear(F.linear(x, down), up)  # [..., rank] -> [..., out]
        return y


def attach_loras(model: nn.Module, loras: list[tuple[LoraWeights, float]]) -> nn.Module:
    """Unmerged: swap each targeted nn.Linear for a LoraLinear. diff / diff_b / diff_m deltas (no low-rank form) are
    merged."""
    for lora, scale in loras:
        targets = _targets(model, lora)
        full = LoraWeights(lora.name)
        for m, lin in targets.items():
            layer = lora.layers[m]
            if layer.down is not None:
                if not isinstance(lin, LoraLinear):
                    parent_name, _, child = m.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    lin = LoraLinear(lin)
                    setattr(parent, child, lin)
                lin.add(lora.name, layer.down, layer.up, scale * layer.factor)
            if layer.diff is not None or layer.diff_b is not None or layer.diff_m is not None:
                full.layers[m] = LoraLayer(diff=layer.diff, diff_b=layer.diff_b, diff_m=layer.diff_m)
        if full.layers:
            merge_loras(model, [(full, scale)])
    return model


def apply_loras(model: nn.Module, loras: list[tuple[LoraWeights, float]], mode: str = "merged") -> nn.Module:
    """Apply [(lora, scale), ...] to `model` in place: mode "merged" (fast) or "unmerged" (exact, swappable)."""
    if mode == "merged":
        return merge_loras(model, loras)
    if mode == "unmerged":
        return attach_loras(model, loras)
    raise LoraError(f"LoRA mode {mode!r}: use merged or unmerged")
