"""The kernel choices of one pipeline, in one object: handed to the Pipeline, applied to its models, recorded in
the sidecar and hashed into the render hash — never a process global, so two pipelines in one process (a preview
and a final render) can differ.

    attention    a backend name of kernels/backends.py, or "auto" (measured fastest on this GPU; "sdpa" on CPU)
    allow_lossy  "auto" may pick backends whose numbers differ beyond bf16 rounding (fp8_triton);
                 off by default, so a fast backend never silently changes a final render
    fused        the Triton ops of kernels/fused.py on CUDA (the plain math elsewhere)
    compile      regional torch.compile of the blocks: auto (CUDA, not FSDP-sharded) | on | off
    precision    auto (bf16 on a GPU, fp32 on the CPU) | bf16 | fp16 | fp32   (FP8 linears: quality=fast,
                 renderer/tiers.py — a tier changes the weights, so it lives with the pipeline's tier, not here)
    step_cache   off   (the step cache is the quality tier's: quality.cache, renderer/cache.py)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("auto", "on", "off")
STEP_CACHES = ("off",)


@dataclass(frozen=True)
class KernelSettings:
    attention: str = "auto"
    allow_lossy: bool = False
    fused: bool = True
    compile: str = "auto"
    precision: str = "auto"
    step_cache: str = "off"

    def __post_init__(self) -> None:
        from kernels.backends import BACKEND_NAMES

        if self.attention not in BACKEND_NAMES:
            raise ValueError(f"kernels.attention={self.attention!r}: choose one of {', '.join(BACKEND_NAMES)}")
        for name, value, allowed in (("compile", self.compile, COMPILE_MODES),
                                     ("precision", self.precision, PRECISIONS),
                                     ("step_cache", self.step_cache, STEP_CACHES)):
            if value not in allowed:
                raise ValueError(f"kernels.{name}={value!r}: choose one of {', '.join(allowed)}")
        for name in ("allow_lossy", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"kernels.{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "KernelSettings":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown kernel setting(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        if isinstance(d.get("compile"), bool):  # YAML `compile: true` reads as a bool
            d["compile"] = "on" if d["compile"] else "off"
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
