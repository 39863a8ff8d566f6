"""`key=value` command lines for the small tools that run without Hydra (benchmarks.fp8_micro,
benchmarks.calibrate_cache, renderer.cache_schedules): the same parsing and the same error everywhere."""
from __future__ import annotations

from typing import Iterable


def parse_key_values(argv: Iterable[str], defaults: dict, text_keys: Iterable[str] = ()) -> dict:
    """`defaults` updated from `key=value` arguments. Values are parsed as YAML (numbers, lists, true/false, null),
    except for the keys in `text_keys`, which stay strings (prompts, paths). ValueError names the valid keys."""
    import yaml

    opts, text = dict(defaults), set(text_keys)
    for a in argv:
        key, sep, raw = a.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"argument {a!r}: use key=value with key one of {', '.join(defaults)}")
        opts[key] = raw if key in text else yaml.safe_load(raw)
    return opts
