"""The model families wanrender renders, by name.

A family is a subpackage of renderer/families/ that defines `SPEC` (a renderer.families.spec.FamilySpec).
Packages are discovered, so adding a family is adding its package and a preset (conf/model/*.yaml) whose
`family:` names it; nothing here changes.
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from renderer.families.spec import FamilySpec

__all__ = ["FamilySpec", "family_names", "get_family"]


@lru_cache(maxsize=None)
def _discover() -> dict[str, str]:
    """family name -> module path, for every subpackage here (imported lazily by get_family)."""
    return {m.name: f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.ispkg}


def family_names() -> list[str]:
    return sorted(_discover())


def get_family(name: str) -> FamilySpec:
    """The spec of family `name`; a ValueError naming the known families otherwise."""
    modules = _discover()
    if name not in modules:
        raise ValueError(f"unknown model family {name!r}: known families are {', '.join(family_names())}")
    spec = getattr(importlib.import_module(modules[name]), "SPEC", None)
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"renderer/families/{name} defines no SPEC (a FamilySpec)")
    return spec
