"""The "auto" attention backend: pick the fastest kernel once per (GPU, dtype, head dim, length bucket).

The choice is measured at the first call of a new bucket (every available backend at that call's shape, a few
timed runs each, a few seconds at 720p) and cached in memory and on disk, as JSON in $WANRENDER_CACHE or
~/.cache/wanrender, so later processes and later shots skip the measurement. With measuring off
(WANRENDER_ATTN_AUTOTUNE=0 or `set_measuring(False)`) a fixed ranking from our measurements is used instead:
on Hopper cuDNN > flash > efficient (anchors.md: 580 / 363 / 183 TFLOP/s at 75,600 tokens on an H200).

On the CPU "auto" is always "sdpa": nothing to choose, and the CPU parity tests stay bit-identical.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

_memory: dict[str, str] = {}  # key -> backend chosen (measured, read from disk or ranked)
_made: dict[str, str] = {}  # key -> backend that attention() actually resolved to in this process
_fast: dict[tuple, str] = {}  # (device, dtype, head dim, buckets) -> backend: no device query per call
_disk_loaded = False
_measuring: bool | None = None  # None: follow $WANRENDER_ATTN_AUTOTUNE (default on)

# backends never measured: "math" materialises [B, H, Lq, Lk] (tens of GB at 720p), "auto" is us
_NOT_MEASURED = ("auto", "math")


def set_measuring(on: bool | None) -> None:
    """Measure unknown buckets (True), use the fixed ranking (False), or follow the environment (None)."""
    global _measuring
    _measuring = on


def measuring() -> bool:
    if _measuring is not None:
        return _measuring
    return os.environ.get("WANRENDER_ATTN_AUTOTUNE", "1").lower() not in ("0", "false", "no", "off")


def cache_path() -> Path:
    root = os.environ.get("WANRENDER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wanrender")
    return Path(root) / "attention_auto.json"


def length_bucket(n: int) -> int:
    """Next power of two ≥ n: 75,600 tokens (720p) and 32,760 (480p) land in different buckets."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cache_key(device: torch.device, dtype: torch.dtype, head_dim: int, lq: int, lk: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    # the torch version is in the key: a new torch can reorder the kernels' speeds
    dt = str(dtype).removeprefix("torch.")
    return f"{name}|{dt}|d{head_dim}|q{length_bucket(lq)}|k{length_bucket(lk)}|torch{torch.__version__}"


def ranked(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The choice without measuring, from what we measured on the GPUs we render on."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"  # fp32 on a GPU: torch's own pick (efficient or math) is all there is
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9 and head_dim <= 128 and hasattr(torch.backends.cuda, "cudnn_sdp_enabled"):
        return "sdpa_cudnn"
    if major >= 8 and head_dim <= 256:
        return "sdpa_flash"
    return "sdpa_efficient"


def _load_disk() -> None:
    global _disk_loaded
    _disk_loaded = True
    try:
        data = json.loads(cache_path().read_text())
        from kernels.backends import LOSSY

        for key, entry in data.items():
            # a lossy choice only counts under a lossy key (an edited file cannot make an exact "auto" lossy)
            if entry["backend"] not in LOSSY or key.endswith("|lossy"):
                _memory.setdefault(key, entry["backend"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no cache yet, or a damaged one: measure again


def _save_disk(key: str, entry: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = entry
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: ranks measuring at once never leave a half-written file
    except OSError:
        pass  # a read-only home: the choice still holds for this process


def _time_once(fn, reps: int) -> float:
    """Median seconds of `reps` runs of fn, timed with CUDA events after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def candidates(device: torch.device, allow_lossy: bool = False) -> list[str]:
    """The backends "auto" may choose on `device`: the exact ones (kernels/backends.py EXACT) unless lossy ones are
    allowed; never "math" (it materialises [B, H, Lq, Lk]: tens of GB at 720p)."""
    from kernels.backends import EXACT, available_backends

    return [n for n in available_backends(device) if n not in _NOT_MEASURED and (allow_lossy or n in EXACT)]


def measure_backends(device: torch.device, dtype: torch.dtype, batch: int, lq: int, lk: int, heads: int,
                     head_dim: int, reps: int = 3, allow_lossy: bool = False) -> dict[str, float]:
    """Seconds per call of every candidate backend at one shape (backends that cannot run it are left out)."""
    from kernels.backends import available_backends, run_backend

    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    # random data, never zeros: zeros can run faster than real activations
    q = torch.randn(batch, lq, heads, head_dim, device=device, dtype=dtype, generator=g)  # [B, Lq, H, Dh]
    k = torch.randn(batch, lk, heads, head_dim, device=device, dtype=dtype, generator=g)  # [B, Lk, H, Dh]
    v = torch.randn(batch, lk, heads, head_dim, device=device, dtype=dtype, generator=g)  # [B, Lk, H, Dh]
    times: dict[str, float] = {}
    for name in candidates(device, allow_lossy):
        try:
            t0 = time.perf_counter()
            run_backend(name, q, k, v)
            torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            best = min(times.values(), default=None)
            if best is not None and first > 4 * best + 0.05:
                times[name] = first  # clearly slower even counting its warm-up: not worth timed runs
                continue
            times[name] = _time_once(lambda: run_backend(name, q, k, v), reps)
        except (RuntimeError, NotImplementedError, ValueError):
            continue  # this kernel does not take this shape / dtype / head dim
    del q, k, v
    torch.cuda.empty_cache()
    return times


def _assume_constant_result(fn):
    # exactly what torch._dynamo.assume_constant_result sets (a test compares the two), without importing dynamo
    # (a second or two) in every process that only imports the model
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def choose(device: torch.device, dtype: torch.dtype, head_dim: int, lq: int, lk: int,
           batch: int = 1, heads: int = 1, allow_lossy: bool = False) -> str:
    """The backend "auto" runs for this call. Arguments are plain Python values (shapes are ints), so under
    torch.compile (dynamic=False) dynamo calls this once while tracing and bakes the answer into the graph."""
    device = torch.device(device)
    fast_key = (str(device), dtype, head_dim, length_bucket(lq), length_bucket(lk), allow_lossy)
    if fast_key in _fast:  # decided (or pinned to rank 0's choice) before
        return _fast[fast_key]
    if device.type != "cuda":
        _made[device.type] = "sdpa"
        return "sdpa"
    key = cache_key(device, dtype, head_dim, lq, lk) + ("|lossy" if allow_lossy else "")
    if not _disk_loaded:
        _load_disk()
    name = _memory.get(key)
    if name is None:
        name = ranked(device, dtype, head_dim)
        if measuring():
            times = measure_backends(device, dtype, batch, lq, lk, heads, head_dim, allow_lossy=allow_lossy)
            if times:
                name = min(times, key=times.get)
                _save_disk(key, {"backend": name, "seconds": times, "shape": [batch, lq, lk, heads, head_dim],
                                 "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _memory[key] = name
    _made[key] = name
    _fast[fast_key] = name
    return name


def prepare(device: torch.device, dtype: torch.dtype, batch: int, lq: int, lk: int, heads: int,
            head_dim: int, allow_lossy: bool = False, agree: Callable[[str], str] | None = None) -> str:
    """Make the choice for a shape ahead of time, outside any compiled region (what WanDiT.forward does).

    agree: in a render group, a function every rank calls at the same point that returns rank 0's value
    (RenderGroup.agree); the group then runs rank 0's choice everywhere, whatever each rank measured."""
    device = torch.device(device)
    name = choose(device, dtype, head_dim, lq, lk, batch, heads, allow_lossy)
    if agree is not None:
        name = agree(name)
        pin(device, dtype, head_dim, lq, lk, name, allow_lossy)
    return name


def pin(device: torch.device, dtype: torch.dtype, head_dim: int, lq: int, lk: int, name: str,
        allow_lossy: bool = False) -> None:
    """Make `choose` return `name` for this bucket in this process (rank 0's choice on the other ranks)."""
    device = torch.device(device)
    _fast[(str(device), dtype, head_dim, length_bucket(lq), length_bucket(lk), allow_lossy)] = name
    if device.type == "cuda":
        key = cache_key(device, dtype, head_dim, lq, lk) + ("|lossy" if allow_lossy else "")
        _memory[key] = _made[key] = name
    else:
        _made[device.type] = name


def choices_made() -> dict[str, str]:
    """key -> backend for every bucket "auto" resolved in this process."""
    return dict(_made)


def forget() -> None:
    """Drop the in-memory choices (tests; the disk cache stays)."""
    global _disk_loaded
    _memory.clear()
    _made.clear()
    _fast.clear()
    _disk_loaded = False
