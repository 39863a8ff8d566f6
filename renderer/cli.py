"""The `wanrender` command.

    wanrender generate [overrides]     render one shot to <out>/<name>.mp4 + sidecar JSON
    wanrender render manifest=FILE     render a manifest of shots on the render farm (Ray)
    wanrender prepare plate=F image=F mode=animate|replace out=DIR prepare.checkpoint=DIR
                                       preprocess a plate for an Animate shot (pose, face, [mask, background])
    wanrender serve [overrides]        the HTTP submission service (token in WANRENDER_SERVICE_TOKEN)
    wanrender config [overrides]       print the resolved config
    wanrender verify FILE [--trust ROOT.pem]            check an MP4's C2PA signature and content hash (exit 0/1)
    wanrender release OUT SHOT --by NAME --reason TEXT  deliver a shot the safety gate held in OUT/quarantine/

Overrides are Hydra's: model=t2v_a14b model.checkpoint=/ckpt/Wan2.2-T2V-A14B prompt="..." seed=7
`wanrender COMMAND --help` describes one command. Exit codes: 0 done, 1 a shot failed, 2 bad input (nothing
was rendered or reserved), 3 the machine stopped the job (disk full, read-only folder), 130 interrupted.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import replace

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("wanrender")


def shot_guidance(settings):
    """The guidance scale(s) the shot's guider will use: the quality tier's (draft: 1.0), else the shot's, else the
    model preset's — the precedence of TierSettings.apply + ShotSpec.resolve, without resolving the rest of the shot.
    A family with its own shot loop (Animate) takes one scale and no tier (animate_settings)."""
    from renderer.families import get_family

    own_loop = get_family(settings.model.family).generate is not None
    if not own_loop and settings.quality is not None and settings.quality.guidance is not None:
        return settings.quality.guidance
    g = settings.shot.guidance if settings.shot.guidance is not None else settings.model.guidance
    return g[0] if own_loop and isinstance(g, (list, tuple)) else g


def group_from(settings):
    """Under torchrun (WORLD_SIZE > 1) the shot is rendered by a group laid out by the `parallel` settings —
    the same group code the Ray farm runs — on the layout for this shot (renderer.parallel.effective_layout: a
    shot without CFG does not leave the cfg=2 half idle). Returns None for one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    from renderer.parallel import ParallelConfig, cfg_active, effective_layout, init_group
    from renderer.parallel.config import layout_change_note

    heads = settings.model.dit.num_heads
    configured = settings.parallel or ParallelConfig(ulysses=world)
    configured.validate(world, heads)  # exact message before any process group forms
    pcfg = effective_layout(configured, cfg_active(shot_guidance(settings)), heads)
    note = layout_change_note(configured, pcfg, f"shot {settings.name or settings.shot.shot_id}")
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, flush=True)
    group = init_group(pcfg)
    group.configured = configured
    return group


def cmd_generate(cfg: DictConfig) -> int:
    from renderer.output import write_shot
    from renderer.pipeline import Pipeline
    from renderer.presets import check_shot
    from renderer.settings import Settings, SettingsError

    try:
        settings = Settings.from_config(cfg)
    except SettingsError as e:
        for field, msg in e.problems:
            where = f"shot {cfg.name or 'shot'}: " if field.startswith("prompt") else ""  # a structured prompt
            print(f"error: {where}{field}: {msg}", file=sys.stderr)
        return 2
    preset, shot = settings.model, settings.shot
    from renderer.families import get_family

    family_generate = get_family(preset.family).generate
    if family_generate is not None:  # a family that renders its own shots (Animate: chained clips)
        return family_generate(cfg, preset, settings.render, lambda: group_from(settings))
    # every check on the request runs before a model is loaded or a GPU touched
    from renderer.gate import gate_problems

    s = shot.resolve(preset)
    problems = gate_problems(settings) + check_shot(preset, s.task, s.size, s.frames, s.steps, s.prompt, s.image,
                                                    s.sampler, seed=s.seed, guidance=s.guidance, shift=s.shift)
    problems = problems or _folder_problems(settings.out, preset, s)
    if problems:
        for field, msg in problems:
            print(f"error: shot {s.shot_id}: {field}: {msg}", file=sys.stderr)
        return 2
    tier = settings.quality
    try:  # a draft on real weights needs its LoRA files: checked before anything loads
        tier.loras_per_expert(len(preset.experts), random_weights=preset.checkpoint is None)
    except ValueError as e:
        print(f"error: shot {s.shot_id}: {e}", file=sys.stderr)
        return 2
    try:
        group = group_from(settings)
    except ValueError as e:  # a parallel layout that does not fit the group: the exact message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = settings.render
    if group is not None:
        options = replace(options, device=str(group.device))
    from renderer.safety import OutputScreen

    screen = OutputScreen.from_settings(settings.delivery.safety) if (group is None or group.rank == 0) else None
    pipe = Pipeline(preset, checkpoint=preset.checkpoint, options=options, group=group, tier=tier)
    if not pipe.is_main:
        pipe.render(shot)  # every rank takes part in the denoising; rank 0 decodes and writes
        group.close()
        return 0
    s = tier.apply(shot).resolve(preset)
    print(f"wanrender: {preset.name} on {pipe.device} ({pipe.describe()['dtype']}, experts {pipe.placement}), "
          f"{s.task} {s.size} {s.frames} frames, {s.steps} steps, seed {s.seed}, quality {tier.name}")
    result = pipe.render(shot)
    extra = {"config": settings.resolved}
    if group is not None:  # the layout the shot ran on beside the configured one (config.parallel)
        from renderer.parallel.config import layout_record

        extra["parallel"] = layout_record(group.configured, group.pcfg)
    mp4, side = write_shot(pipe, result, settings.out, name=tier.output_stem(settings.name or result.shot.shot_id),
                           label=settings.label, extra=extra, delivery=settings.delivery,
                           prompt_fields=settings.prompt_fields, screen=screen)
    t = result.timings
    print(f"wrote {mp4} and {side.name}: text {t['text_encode']:.1f}s, denoise {t['denoise']:.1f}s, "
          f"decode {t['vae_decode']:.1f}s, write {t['mp4_write']:.1f}s")
    if mp4.parent.name == "quarantine":
        from renderer.video_io import read_json

        print(f"HELD by the content-safety gate: {read_json(side)['safety']['reason']}; not delivered. A person "
              f"who has looked at it may deliver it: wanrender release {settings.out} {mp4.stem} --by NAME "
              f"--reason ...")
        if group is not None:
            group.close()
        return 1
    if group is not None:
        group.close()
    return 0


def _folder_problems(out: str, preset, s) -> list[tuple[str, str]]:
    """The output folder (writable, room for the clip) and the checkpoint folder, before anything loads."""
    from renderer.preflight import check_checkpoint, check_output, estimate_output_bytes
    from renderer.presets import parse_size

    w, h = parse_size(s.size)
    problems = [("out", m) for m in check_output(out, estimate_output_bytes([(w, h, s.frames)]), create=True)]
    if preset.checkpoint:
        problems += [("model.checkpoint", m) for m in check_checkpoint(preset, preset.checkpoint)]
    return problems


def cmd_render(cfg: DictConfig) -> int:
    from jobs.farm import run_job  # the render farm (Ray)

    return run_job(cfg)


def cmd_prepare(cfg: DictConfig) -> int:
    from pathlib import Path

    from renderer.prepare import PrepareError, prepare

    p = cfg.prepare
    missing = [f"{k}=" for k, v in (("plate", p.plate), ("image", cfg.image)) if not v]
    if missing:
        print(f"error: prepare: {' and '.join(missing)} required (plate= the performer's footage, image= the "
              "character)", file=sys.stderr)
        return 2
    from renderer.settings import Settings, SettingsError

    try:
        settings = Settings.from_config(cfg).prepare.resolved_device()  # the one conversion of the config
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        meta = prepare(p.plate, cfg.image, cfg.out, settings, checkpoint_root=p.checkpoint, force=bool(p.force))
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = "reused (same plate, image, settings and models)" if meta["cached"] else "written"
    print(f"prepare: {cfg.out} {state}: {meta['mode']}, {meta['frames']} frames {meta['width']}x{meta['height']} "
          f"at {meta['fps']} fps; check {Path(cfg.out) / 'preview.png'} before rendering")
    return 0


# `wanrender prepare plate=... mode=... force=...` are short for prepare.plate= etc.
PREPARE_SHORT = ("plate", "mode", "force", "retarget", "checkpoint")


def cmd_serve(cfg: DictConfig) -> int:
    from jobs.service.api import serve_from_config  # the HTTP submission service (FastAPI + Ray job submission)

    return serve_from_config(cfg)


def _ctrl_c_stops_the_job() -> None:
    """A process started in the background (`nohup wanrender serve &`, a CI runner's `cmd &`) inherits SIGINT
    *ignored*, and Python then never raises KeyboardInterrupt: Ctrl-C, and the service's cancel (SIGINT to the job's
    driver, jobs/service/core.py), would do nothing and the job would run to its end. Restore the default handler so
    both always stop a job cleanly (groups ended, report written, lock released). A terminal sends Ctrl-C only to its
    foreground process group, so a background job still does not see the terminal's Ctrl-C."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _ctrl_c_stops_the_job()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if argv[0] in ("verify", "release"):  # plain argparse commands: no Hydra config involved
        from jobs.safety import cmd_release
        from renderer.gate import cmd_verify

        return {"verify": cmd_verify, "release": cmd_release}[argv[0]](argv[1:])
    command, overrides = argv[0], argv[1:]
    if any(a in ("-h", "--help", "help") for a in overrides):
        from renderer.cli_help import HELP

        if command in HELP:
            print(HELP[command])
            return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "prepare":
        overrides = [f"prepare.{o}" if o.split("=", 1)[0] in PREPARE_SHORT else o for o in overrides]
    commands = {"generate": cmd_generate, "render": cmd_render, "prepare": cmd_prepare, "serve": cmd_serve,
                "config": lambda c: print(OmegaConf.to_yaml(c)) or 0}
    if command not in commands:
        print(f"unknown command {command!r}: use {', '.join(commands)}\n{__doc__}", file=sys.stderr)
        return 2
    from renderer.settings import compose

    try:
        cfg = compose(overrides)
    except Exception as e:  # Hydra's own errors name the bad override; show them without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return int(commands[command](cfg) or 0)
    except KeyboardInterrupt:
        print("interrupted: nothing partial was left under a final name", file=sys.stderr)
        return 130
    except OSError as e:
        from renderer.preflight import is_environment_error

        if not is_environment_error(e):
            raise
        print(f"error: {e}\nthe machine stopped the render (disk full, read-only or no permission): fix that and "
              f"run again", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
