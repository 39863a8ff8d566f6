"""The scaling benchmark: the same shot on 1 GPU and on N GPUs per layout, beside the published anchors.

    python -m benchmarks.scaling model=t2v_a14b gpus=[1,2,4,8] layouts=[auto,ulysses8] timed_steps=4 out=out/a14b
    python -m benchmarks.scaling bench=a14b_720p gpus=[1,4] timed_steps=2 out=out/a14b     # conf/bench/a14b_720p.yaml
    python -m benchmarks.scaling bench=smoke out=out/bench                                  # CI: tiny model, CPU

`bench=NAME` picks the config file conf/bench/NAME.yaml (default `scaling`); every other argument is a Hydra
override of it. Each row is one `torchrun --nproc-per-node N -m benchmarks.worker` (a subprocess with its own
timeout); the 1-GPU row uses the `single` layout, N > 1 every layout asked for ("auto": conf/parallel/gpus<N>.yaml,
laid out for the row's quality tier as a render would be: a tier without CFG — draft — folds gpus2's cfg=2 into
ulysses2, see renderer.parallel.effective_layout; a named layout runs as named, idle CFG half included).
Results go to <out>/scaling.{json,md,png} after every row, so a run cut short keeps the rows it finished.
Configs are composed by Hydra (hydra-core is an install requirement: `pip install -e .` on a GPU machine).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STAGES = ("text_encode", "denoise", "vae_decode", "total")


# -- configuration ------------------------------------------------------------------------------------------------
def load_config(bench: str = "scaling", overrides: list[str] | None = None) -> dict:
    """conf/bench/<bench>.yaml + overrides -> a plain dict, composed by Hydra (renderer/conf.py)."""
    from omegaconf import OmegaConf

    from renderer.conf import compose, group_names

    if bench not in group_names("bench"):
        raise ValueError(f"no benchmark config {bench!r}: choose one of {', '.join(group_names('bench'))}")
    try:
        cfg = compose(list(overrides or []), config_name=f"bench/{bench}")
    except Exception as e:  # Hydra's errors name the bad override (a key that does not exist, a bad value)
        raise ValueError(f"benchmark config {bench}: {e}") from e
    return OmegaConf.to_container(cfg, resolve=True)


# -- the rows to run ----------------------------------------------------------------------------------------------
def parallel_preset(name: str) -> dict:
    from renderer.conf import group_names, group_option

    if name not in group_names("parallel"):
        raise ValueError(f"no parallel preset {name!r}: choose one of {', '.join(group_names('parallel'))} or auto")
    return group_option("parallel", name)


def plan_rows(cfg: dict, available_gpus: int | None) -> tuple[list[dict], list[dict]]:
    """[(gpus, layout name, parallel dict, render options)], [skipped rows with the reason]."""
    heads = int(cfg["model"]["dit"]["num_heads"])
    rows, skipped = [], []
    qualities = list(dict.fromkeys(cfg.get("qualities") or ["exact"]))
    for q in qualities:  # one set of rows per quality tier (renderer/tiers.py); exact rows keep their labels
        two_passes = tier_runs_cfg(cfg, q)
        for row in _plan_gpu_rows(cfg, available_gpus, heads, skipped if q == qualities[0] else [], two_passes):
            if q != "exact":
                row["layout"] = f"{row['layout']}+{q}"
            rows.append({**row, "quality": q})
    return rows, skipped


def tier_runs_cfg(cfg: dict, quality: str) -> bool:
    """Does a render of the bench shot in `quality` run cond and uncond each step? The tier's guidance (draft:
    1.0), else the shot's, else the model preset's — the precedence of TierSettings.apply + ShotSpec.resolve."""
    from renderer.parallel.config import cfg_active
    from renderer.tiers import load_tier

    tier = load_tier(quality, (cfg.get("quality_overrides") or {}) if quality != "exact" else None)
    g = next(v for v in (tier.guidance, (cfg.get("shot") or {}).get("guidance"), cfg["model"]["guidance"])
             if v is not None)
    return cfg_active(g)


def _plan_gpu_rows(cfg: dict, available_gpus: int | None, heads: int, skipped: list[dict],
                   two_passes: bool = True) -> list[dict]:
    """Rows of one quality tier; two_passes: its guider runs cond and uncond (False: `auto` folds idle cfg)."""
    from renderer.parallel.config import ParallelConfig, effective_layout

    rows = []
    for n in dict.fromkeys(int(g) for g in cfg["gpus"]):  # asked order, no repeats
        if available_gpus is not None and n > available_gpus:
            skipped.append({"gpus": n, "layout": "-", "why": f"only {available_gpus} GPUs on this machine"})
            continue
        if n == 1:
            render = dict(cfg["render"])
            layout = "single"
            if cfg.get("offload"):  # the 24 GB card: idle expert in CPU memory, text encoder on the CPU
                render.update(placement="offload", t5_cpu=True)
                layout = "single+offload"
            rows.append({"gpus": 1, "layout": layout, "parallel": None, "render": render})
            continue
        planned: list[tuple] = []  # (mesh shape, fsdp, impl) of this GPU count's rows: one row per real layout
        for name in dict.fromkeys(cfg["layouts"]):
            chosen = name
            if name == "auto":
                chosen = f"gpus{n}" if (CONF / "parallel" / f"gpus{n}.yaml").is_file() else None
            par = parallel_preset(chosen) if chosen else {"ulysses": n}
            label = chosen or f"ulysses{n} (auto)"
            layout_from = None
            try:
                pcfg = ParallelConfig.from_dict(par).validate(n, heads)
                if name == "auto":  # the renderer's choice for this tier (renderer.parallel.effective_layout)
                    eff = effective_layout(pcfg, two_passes, heads)
                    if eff != pcfg:
                        layout_from = f"auto: {label} with its cfg dim folded in (the tier runs no CFG)"
                        pcfg, par, label = eff, eff.to_dict(), eff.short_name()
                else:  # a named layout runs as named (e.g. gpus2 for a draft, to measure the idle CFG half)
                    par = {**par, "fold_idle_cfg": False}
            except ValueError as e:
                skipped.append({"gpus": n, "layout": label, "why": str(e)})
                continue
            key = (pcfg.mesh_shape, pcfg.fsdp, pcfg.ulysses_impl)
            if key in planned:
                skipped.append({"gpus": n, "layout": label, "why": f"same layout as another {n}-GPU row "
                                                                   f"({pcfg.short_name()})"})
                continue
            planned.append(key)
            row = {"gpus": n, "layout": label, "parallel": par, "render": dict(cfg["render"])}
            if layout_from:
                row["layout_from"] = layout_from
            rows.append(row)
    return rows


def _row_id(row: dict) -> str:
    return f"g{row['gpus']}_{row['layout'].split()[0].replace('+', '_')}"


def scratch_dir(cfg: dict) -> Path:
    """Where rows/, logs/ and videos/ go: `scratch`, else under `out` (the GPU runs keep `out` to the 3 reports:
    only a few files come back from those machines)."""
    return Path(cfg.get("scratch") or cfg["out"])


def worker_spec(cfg: dict, row: dict, out: Path) -> dict:
    rid = _row_id(row)
    render = dict(row["render"])
    if render.get("device") == "cpu" or not _cuda_available():
        render["cpu_threads"] = cfg.get("cpu_threads") or max(1, (os.cpu_count() or 1) // row["gpus"])
    return {"name": f"{cfg.get('name') or 'bench'}_{rid}", "layout": row["layout"], "model": cfg["model"],
            "shot": cfg["shot"], "render": render, "parallel": row["parallel"], "timed_steps": cfg.get("timed_steps"),
            "warmup": cfg.get("warmup", "auto"), "mp4": cfg.get("mp4", "auto"),
            "inject_step_sleep_s": cfg.get("inject_step_sleep_s") or 0,
            "quality": row.get("quality", "exact"), "quality_overrides": cfg.get("quality_overrides") or {},
            "layout_from": row.get("layout_from"),
            "out_json": str(out / "rows" / f"{rid}.json"), "out_dir": str(out / "videos")}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


_RUNNING: list[subprocess.Popen] = []  # the row in flight, for the SIGTERM handler


def _on_sigterm(signum, frame):
    """`timeout N python -m benchmarks.scaling ...` ends with SIGTERM: take the row's torchrun tree down too (it
    runs in its own session, so nothing else would, and it would hold the GPUs)."""
    for proc in _RUNNING:
        _kill_tree(proc)
    raise SystemExit(128 + signum)


def run_row(cfg: dict, row: dict, timeout: float | None = None) -> dict:
    """One torchrun; returns the worker's measurements, or {"error": ..., "log": ...} (the log then also copied
    next to the reports)."""
    rid = _row_id(row)
    out = scratch_dir(cfg)
    spec = worker_spec(cfg, row, out)
    for d in ("rows", "logs", "videos"):
        (out / d).mkdir(parents=True, exist_ok=True)
    spec_path = out / "rows" / f"{rid}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result = Path(spec["out_json"])
    result.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    log = out / "logs" / f"{rid}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={row['gpus']}",
           "-m", "benchmarks.worker", "--spec", str(spec_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    if "cpu_threads" in spec["render"]:
        env["OMP_NUM_THREADS"] = str(spec["render"]["cpu_threads"])
    timeout = float(timeout if timeout is not None else cfg.get("row_timeout_s") or 900)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        # own session: on a timeout the whole tree (torchrun and its ranks) is killed, not just torchrun
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        _RUNNING.append(proc)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            return _failed(cfg, row, log, f"timed out after {timeout:.0f} s")
        finally:
            _RUNNING.remove(proc)
    wall = time.perf_counter() - t0
    if rc != 0 or not result.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        return _failed(cfg, row, log, f"exit status {rc}: " + " | ".join(tail)[-1500:])
    return {**json.loads(result.read_text()), "launch_wall_s": wall, "log": str(log)}


def _failed(cfg: dict, row: dict, log: Path, error: str) -> dict:
    keep = Path(cfg["out"]) / f"failed_{log.name}"
    if keep.resolve() != log.resolve():
        keep.write_bytes(log.read_bytes())
    return {**_ident(row), "error": error, "log": str(keep)}


def _ident(row: dict) -> dict:
    return {"gpus": row["gpus"], "layout": row["layout"]}


def _kill_tree(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


# -- the report ---------------------------------------------------------------------------------------------------
def add_speedups(rows: list[dict]) -> None:
    """Speedup and parallel efficiency of every measured row against the 1-GPU row (same run)."""
    base = next((r for r in rows if r.get("gpus") == 1 and "error" not in r), None)
    for r in rows:
        if "error" in r or base is None:
            continue
        r["speedup"] = base["seconds"]["total"] / r["seconds"]["total"]
        r["speedup_step"] = base["step"]["median_s"] / r["step"]["median_s"]
        r["efficiency"] = r["speedup"] / r["gpus"]
        r["baseline"] = f"{base['layout']} on {base['device_name']}"


def build_report(cfg: dict, rows: list[dict], skipped: list[dict], argv: list[str]) -> dict:
    from benchmarks.anchors import anchors_for

    from renderer.presets import ModelPreset
    from renderer.provenance import code_version, provenance

    preset = ModelPreset.from_dict(cfg["model"])
    s = cfg["shot"]
    size, frames, steps = s.get("size") or preset.size, s.get("frames") or preset.frames, s.get("steps") or preset.steps
    k = min(int(cfg.get("timed_steps") or steps), steps)
    add_speedups(rows)
    return {"title": cfg.get("name") or f"{preset.name} {size}", "model": preset.name, "size": size,
            "frames": frames, "steps": steps, "timed_steps": k,
            "scaled": f"scaled from {k} of {steps} steps" if k < steps else None,
            "command": "python -m benchmarks.scaling " + " ".join(argv), "code_version": code_version(),
            "provenance": provenance(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": [r for r in rows if "error" not in r], "failed": [r for r in rows if "error" in r],
            "skipped": skipped, "anchors": [a.to_dict() for a in anchors_for(preset.name, size)], "config": cfg}


def check_report(report: dict, planned: int, files: list[Path]) -> list[str]:
    """Why the report is incomplete (empty: complete): every planned row measured, every stage a number."""
    problems = [f"row {r['gpus']} GPU(s) {r['layout']} failed: {r['error']}" for r in report["failed"]]
    if len(report["rows"]) != planned:
        problems.append(f"{len(report['rows'])} of {planned} planned rows measured")
    for r in report["rows"]:
        where = f"row {r['gpus']} GPU(s) {r['layout']}"
        for stage in STAGES:
            if not isinstance(r["seconds"].get(stage), (int, float)):
                problems.append(f"{where}: no {stage} time")
        if r["seconds"].get("mp4_write") is None and not r.get("mp4_skipped"):
            problems.append(f"{where}: MP4 write neither measured nor explained")
        if not r["step"].get("median_s"):
            problems.append(f"{where}: no step times")
        # fast and draft rows time every step on purpose (a cached step is not a median step): only exact rows
        # must carry the report's scaling label
        if r.get("quality", "exact") == "exact" and r["scaled"] != report["scaled"]:
            problems.append(f"{where}: scaling label {r['scaled']!r} differs from the report's {report['scaled']!r}")
        if r["device"].startswith("cuda") and not r.get("peak_gpu_allocated_gb_max"):
            problems.append(f"{where}: no peak GPU memory")
        if len(r.get("ranks", [])) != r["gpus"]:
            problems.append(f"{where}: memory of {len(r.get('ranks', []))} of {r['gpus']} ranks")
        if r["gpus"] > 1 and "speedup" not in r:
            problems.append(f"{where}: no speedup (no 1-GPU row)")
    problems += [f"{p} was not written" for p in files if not p.is_file() or p.stat().st_size == 0]
    return problems


def run_scaling(cfg: dict, argv: list[str] | None = None) -> tuple[int, dict]:
    from benchmarks.report import write_reports
    from renderer.presets import ModelPreset, check_shot

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    preset = ModelPreset.from_dict(cfg["model"])
    s = cfg["shot"]
    problems = check_shot(preset, s.get("task") or preset.tasks[0], str(s.get("size") or preset.size),
                          s.get("frames") or preset.frames, s.get("steps") or preset.steps, s.get("prompt"), None)
    if problems:
        for field, msg in problems:
            print(f"error: shot {field}: {msg}", file=sys.stderr)
        return 2, {}
    on_gpu = cfg["render"].get("device") != "cpu" and _cuda_available()
    if on_gpu:
        import torch

        available = torch.cuda.device_count()
    else:
        available = None
    try:
        rows_planned, skipped = plan_rows(cfg, available)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, {}
    argv = list(argv or [])
    t_start = time.monotonic()
    budget = float(cfg["budget_s"]) if cfg.get("budget_s") else None
    planned = len(rows_planned)  # rows a budget cut off still count: the report is then incomplete
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        results = _run_rows(cfg, rows_planned, skipped, budget, t_start, out, argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    report = build_report(cfg, results, skipped, argv)
    files = write_reports(report, out, "scaling")
    print((out / "scaling.md").read_text())
    for sk in skipped:
        print(f"skipped {sk['gpus']} GPU(s) {sk['layout']}: {sk['why']}")
    if cfg.get("check", True):
        bad = check_report(report, planned, files)
        if bad:
            print("INCOMPLETE REPORT:\n  " + "\n  ".join(bad), file=sys.stderr)
            return 1, report
        print(f"report complete: {len(report['rows'])} rows -> {', '.join(str(f) for f in files)}")
    return 0, report


def _run_rows(cfg: dict, rows_planned: list[dict], skipped: list[dict], budget: float | None, t_start: float,
              out: Path, argv: list[str]) -> list[dict]:
    from benchmarks.report import write_reports

    results: list[dict] = []
    for i, row in enumerate(rows_planned):
        timeout = float(cfg.get("row_timeout_s") or 900)
        if budget is not None:  # the device call has a hard limit: stop each row in time, skip what cannot start
            left = budget - (time.monotonic() - t_start)
            if left < 30:
                skipped += [{**_ident(r), "why": f"budget_s={budget:.0f} used up before this row"}
                            for r in rows_planned[i:]]
                break
            timeout = min(timeout, left)
        print(f"[bench {time.strftime('%H:%M:%S')}] {row['gpus']} GPU(s), layout {row['layout']} ...", flush=True)
        res = run_row(cfg, row, timeout)
        results.append(res)
        print(f"[bench {time.strftime('%H:%M:%S')}]   " + _summary(res), flush=True)
        # after every row: a run cut off from outside keeps what it measured
        write_reports(build_report(cfg, results, skipped, argv), out, "scaling")
    return results


def _summary(res: dict) -> str:
    if "error" in res:
        return f"FAILED: {res['error'][:300]} (log {res['log']})"
    sec = res["seconds"]
    note = f" [{res['scaled']}]" if res["scaled"] else ""
    return (f"{res['device_name']}: step median {res['step']['median_s']:.3f} s, total {sec['total']:.2f} s{note}, "
            f"text {sec['text_encode']:.2f} s, decode {sec['vae_decode']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    bench = next((a.split("=", 1)[1] for a in argv if a.startswith("bench=")), "scaling")
    overrides = [a for a in argv if not a.startswith("bench=")]
    try:
        cfg = load_config(bench, overrides)
    except Exception as e:  # Hydra's errors name the bad override: show them without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc, _ = run_scaling(cfg, argv)
    return rc


if __name__ == "__main__":
    sys.exit(main())
