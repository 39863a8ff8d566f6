"""A render group: a placement group of G bundles (one per GPU, STRICT_PACK on one node) and G actors that form
one torch.distributed group, load the models once and render shot after shot. Rank 0 writes the outputs.

The driver talks to a group only through `GroupHandle`: start (non-blocking: the refs it returns resolve when
every rank has loaded its models), render (refs that resolve when the shot is written), kill. Everything an actor
needs travels in a plain dict (`worker_spec`), so an actor never reads the driver's Hydra config.
"""
from __future__ import annotations

import inspect
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

REPO_ROOT = Path(__file__).resolve().parents[1]


class InjectedCrash(RuntimeError):
    """Raised by the fault-injection hook (tests): a simulated failure that is not the shot's fault."""


class RenderRank:
    """One rank of a render group (a Ray actor; see `GroupHandle` for how it is created)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.rank = int(spec["rank"])
        self.world_size = int(spec["world_size"])
        self.pipe = None
        self.group = None
        self.animate = None  # Animate shots: jobs/animate_shots.AnimateShots (the family's own clip loop)
        self.delivery = None  # renderer.delivery.DeliverySettings (rank 0 writes)
        self.screen = None  # renderer.safety.OutputScreen, loaded once per actor

    def where(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def master_address(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the group's rendezvous (torch.distributed TCP store)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master: tuple[str, int]) -> dict[str, Any]:
        """Join the process group and load the models; returns where this rank runs and how long loading took."""
        import torch

        from renderer.pipeline import Pipeline, RenderOptions
        from renderer.presets import load_preset

        t0 = time.perf_counter()
        if self.rank == 0:  # the writer: a missing encoder fails the group here, before models load (environment)
            from renderer.video_io import ffmpeg_exe

            ffmpeg_exe()
        options = RenderOptions.from_dict(self.spec["options"])
        if options.torch_device().type == "cpu":
            # Ray gives each rank one CPU; more torch threads than that only fight the other groups on the node
            torch.set_num_threads(max(1, int(self.spec.get("cpu_threads", 1))))
        preset = load_preset(self.spec["preset"])
        supports_group = "group" in inspect.signature(Pipeline.__init__).parameters
        if self.world_size > 1:
            from renderer.parallel.config import ParallelConfig, effective_layout
            from renderer.parallel.group import init_group

            backend = "gloo" if options.torch_device().type == "cpu" else None
            configured = ParallelConfig.from_dict(self.spec["parallel"])
            self.group = init_group(configured, backend, rank=self.rank,
                                    world_size=self.world_size, master_addr=master[0], master_port=master[1],
                                    local_rank=0)  # Ray shows each rank only its own GPU: it is always cuda:0
            # the layout of shots without CFG (drafts, guidance 1): its process groups now, not in a shot
            self.group.prepare_layouts(effective_layout(configured, False, preset.dit.num_heads))
        if self.group is not None:
            options.device = str(self.group.device)  # the rank's own device, as the group placed it
        self._preset, self._options = preset, options  # kept for a tier switch (_use_tier)
        from renderer.families import get_family

        if get_family(preset.family).generate is not None:  # a family with its own shot loop (Animate)
            from jobs.animate_shots import AnimateShots

            self.animate = AnimateShots(preset, options, self.group,
                                        quality_overrides=self.spec.get("quality_overrides"))
        elif self.rank == 0 or supports_group:
            kwargs = {"group": self.group} if supports_group and self.group is not None else {}
            self.pipe = Pipeline(preset, checkpoint=preset.checkpoint, options=options, **kwargs)
        if self.rank == 0:
            from renderer.delivery import DeliverySettings
            from renderer.safety import OutputScreen

            self.delivery = DeliverySettings.from_dict(self.spec.get("delivery"))
            self.screen = OutputScreen.from_settings(self.delivery.safety)
        return {**self.where(), "rank": self.rank, "load_s": round(time.perf_counter() - t0, 3),
                "shares_work": supports_group or self.world_size == 1}

    def _use_tier(self, name: str, log: logging.Logger) -> None:
        """The pipeline for this shot's quality tier. One pipeline at a time (a draft's merged LoRAs and a fast
        tier's FP8 weights replace the exact weights; two sets of A14B experts do not fit one GPU): the group
        rebuilds on a tier change, and job.tiers orders all drafts before any final, so that happens once."""
        current = getattr(self.pipe, "tier", None)
        if current is None or current.name == name:
            return
        import gc

        import torch

        from renderer.pipeline import Pipeline
        from renderer.tiers import load_tier

        tier = load_tier(name, (self.spec.get("quality_overrides") or {}).get(name))
        log.info("switching the group's pipeline to quality %s (models reloaded)", name)
        pipe = self.pipe
        self.pipe = None
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kwargs = {"group": self.group} if self.group is not None else {}
        self.pipe = Pipeline(self._preset, checkpoint=self._preset.checkpoint, options=self._options, tier=tier,
                             **kwargs)

    def _use_layout(self, shot, log: logging.Logger) -> dict[str, Any] | None:
        """Lay the group out for this shot (renderer.parallel.effective_layout): a shot without CFG — a draft, an
        Animate shot, guidance 1 — runs with the cfg dim folded into ulysses or ring instead of idling half the
        group; the next shot with CFG switches back. The meshes exist from setup and the loaded experts are only
        re-pointed (RenderGroup.use_layout). Returns the layout record for the sidecar and the report."""
        if self.group is None:
            return None
        from renderer.parallel.config import cfg_active, effective_layout, layout_change_note, layout_record

        if self.animate is not None:  # the family's own loop: one scale, no tier (animate_settings)
            g = shot.guidance if shot.guidance is not None else self._preset.guidance
            g = g[0] if isinstance(g, (list, tuple)) else g
            experts = [self.animate.stack.model]
        else:
            tier = self.pipe.tier
            g = tier.guidance if tier.guidance is not None else (
                shot.guidance if shot.guidance is not None else self._preset.guidance)
            experts = self.pipe.experts
        configured = self.group.configured
        pcfg = effective_layout(configured, cfg_active(g), self._preset.dit.num_heads)
        self.group.use_layout(pcfg, experts)
        note = layout_change_note(configured, pcfg, f"shot {shot.shot_id}")
        if note:
            log.info(note)
        return layout_record(configured, pcfg)

    def render(self, task: dict[str, Any]) -> dict[str, Any]:
        """Render one shot (every rank), write it (rank 0); the log goes to <out>/logs/<shot>.attempt<N>.log."""
        log_path = Path(task["log"])
        if self.rank:
            log_path = log_path.with_name(log_path.stem + f".rank{self.rank}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(min(root.level, logging.INFO))
        log = logging.getLogger("wanrender.shot")
        t0 = time.perf_counter()
        try:
            where = self.where()
            shot = task["shot"]
            log.info("shot %s attempt %d on group %s rank %d/%d, node %s (%s), pid %d, gpus %s", shot.shot_id,
                     task["attempt"], task["group"], self.rank, self.world_size, where["node_id"][:12], where["ip"],
                     where["pid"], where["gpu_ids"] or "none")
            log.info("settings: task %s size %s frames %d steps %d seed %d guidance %s sampler %s; prompt: %s",
                     shot.task, shot.size, shot.frames, shot.steps, shot.seed, shot.guidance, shot.sampler,
                     shot.prompt)
            if self.pipe is None and self.animate is None:  # a rank the pipeline cannot use yet: nothing to do
                return {"rank": self.rank, "seconds": 0.0}
            fault = task.get("fault")

            def on_step(step: int, total: int) -> None:
                log.info("step %d/%d", step, total)
                if fault and step == int(fault.get("at_step", 1)):
                    _inject(fault, log, handler)

            if self.animate is not None:  # plate-driven: the prepared folder in, the plate's length and audio out
                layout = self._use_layout(shot, log)
                out = {**self.animate.render(task, on_step, self.world_size, t0, self.delivery, self.screen),
                       "rank": self.rank, "node_id": where["node_id"]}
                if layout:
                    out["layout"] = layout
                log.info("done in %.2fs: %s", out["seconds"], out.get("mp4", "(rank > 0 writes nothing)"))
                return out
            self._use_tier(task.get("quality") or "exact", log)
            layout = self._use_layout(shot, log)
            result = self.pipe.render(shot, on_step=on_step)  # every rank of the group takes part
            out: dict[str, Any] = {"rank": self.rank}
            if layout:
                out["layout"] = layout
            if getattr(self.pipe, "is_main", self.rank == 0):  # rank 0 decoded the frames: it writes
                from renderer.output import write_shot

                job = dict(task["job"])
                # accounting up to this write: the driver's figure for earlier attempts + this one's wall so far
                job["gpu_seconds"] = round(job.get("earlier_attempts_gpu_seconds", 0.0)
                                           + job.get("gpus", self.world_size) * (time.perf_counter() - t0), 3)
                extra = {"job": job}
                if layout:
                    extra["parallel"] = layout  # configured and effective layout (renderer/parallel/config.py)
                if task.get("video") and (Path(task["video"]) / "meta.json").is_file():
                    from renderer.prepare.folder import provenance

                    extra["preprocessing"] = provenance(task["video"])  # plate hash, models, settings
                mp4, side = write_shot(self.pipe, result, task["out_dir"], name=task["output"], extra=extra,
                                       delivery=self.delivery,
                                       label=bool(task.get("label") or (self.delivery and self.delivery.label_all)),
                                       prompt_fields=task.get("prompt_fields"), screen=self.screen)
                out.update(mp4=str(mp4), sidecar=str(side), held=mp4.parent.name == "quarantine")
            out.update(seconds=round(time.perf_counter() - t0, 3),
                       timings={k: round(v, 4) for k, v in (getattr(result, "timings", None) or {}).items()},
                       node_id=where["node_id"])
            log.info("done in %.2fs: %s", out["seconds"], out.get("mp4", "(rank > 0 writes nothing)"))
            return out
        except BaseException:
            log.error("failed after %.2fs:\n%s", time.perf_counter() - t0, traceback.format_exc())
            raise
        finally:
            root.removeHandler(handler)
            handler.close()


def folded_layout_line(parallel: dict[str, Any] | None, shots: list, preset) -> str | None:
    """The start-of-job line naming the shots a cfg=2 group renders with the cfg dim folded in (no CFG: drafts,
    Animate, guidance 1) — the same choice `RenderRank._use_layout` makes per shot. None when there are none."""
    if not parallel:
        return None
    from renderer.parallel.config import ParallelConfig, cfg_active, effective_layout

    configured = ParallelConfig.from_dict(parallel)
    folded: dict[str, list[str]] = {}
    for shot in shots:
        g = shot.spec.guidance if shot.spec.guidance is not None else preset.guidance  # the tier is applied
        pcfg = effective_layout(configured, cfg_active(g), preset.dit.num_heads)
        if pcfg != configured:
            folded.setdefault(pcfg.short_name(), []).append(shot.id)
    if not folded:
        return None
    return "; ".join(f"layout: {len(ids)} shot(s) without CFG ({', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''})"
                     f" run as {name} on the {configured.short_name()} groups (parallel.fold_idle_cfg=false keeps "
                     f"{configured.short_name()})" for name, ids in folded.items())


def _inject(fault: dict[str, Any], log: logging.Logger, handler: logging.Handler) -> None:
    """Test hook (WANRENDER_FAULTS): die, hang or raise in the middle of a shot, like a lost GPU would."""
    kind = fault["kind"]
    log.warning("fault injection: %s", kind)
    handler.flush()
    if kind == "crash":
        os._exit(17)  # no cleanup, no exception: what a segfault or a lost node looks like to the driver
    if kind == "hang":
        time.sleep(10**6)
    if kind == "enospc":  # what a full output disk raises in the writer
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    raise InjectedCrash(f"injected failure ({kind})")


RenderRankActor = ray.remote(max_restarts=0, max_task_retries=0)(RenderRank)


@dataclass
class GroupHandle:
    """The driver's view of one render group."""

    gid: str
    size: int
    use_gpus: bool
    worker_spec: dict[str, Any]
    avoid_nodes: frozenset[str] = frozenset()
    state: str = "starting"  # starting | idle | busy | dead
    created: float = field(default_factory=time.monotonic)
    pg: Any = None
    actors: list = field(default_factory=list)
    node_id: str | None = None
    load_s: float | None = None
    ready_ranks: int = 0
    shot_id: str | None = None  # the shot it is rendering
    shot_started: float = 0.0
    attempt: int = 0
    pending_ranks: int = 0
    result: dict | None = None
    label_selector_ok: bool = True
    actor_class: ClassVar[Any] = RenderRankActor  # what each rank runs (a benchmark's stub subclasses this)

    def start(self) -> list:
        """Reserve the bundles and start the ranks; returns the setup refs (one per rank)."""
        bundle = {"GPU": 1, "CPU": 1} if self.use_gpus else {"CPU": 1}
        bundles = [dict(bundle) for _ in range(self.size)]
        kwargs = {}
        if self.avoid_nodes:  # the blocklist: no bundle of a new group on a node that kept failing
            kwargs["bundle_label_selector"] = [{"ray.io/node-id": f"!in({','.join(sorted(self.avoid_nodes))})"}
                                               for _ in bundles]
        try:
            self.pg = placement_group(bundles, strategy="STRICT_PACK", name=f"wanrender-{self.gid}", **kwargs)
        except (TypeError, ValueError):  # a Ray without label selectors: place anywhere, the driver still checks
            self.label_selector_ok = False
            self.pg = placement_group(bundles, strategy="STRICT_PACK", name=f"wanrender-{self.gid}")
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
               "TOKENIZERS_PARALLELISM": "false"}
        for rank in range(self.size):
            spec = {**self.worker_spec, "rank": rank, "world_size": self.size}
            actor = self.actor_class.options(
                num_cpus=1, num_gpus=1 if self.use_gpus else 0, name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
                runtime_env={"env_vars": env}).remote(spec)
            self.actors.append(actor)
        master = self.actors[0].master_address.remote()
        return [a.setup.remote(master) for a in self.actors]

    def render(self, task: dict[str, Any]) -> list:
        self.state, self.shot_id, self.shot_started = "busy", task["shot"].shot_id, time.monotonic()
        self.attempt, self.pending_ranks, self.result = task["attempt"], self.size, None
        return [a.render.remote(task) for a in self.actors]

    def lookup_node(self) -> str | None:
        """The node the bundles sit on, for a group that died before it reported where it runs."""
        if self.node_id or self.pg is None:
            return self.node_id
        try:
            from ray.util.placement_group import placement_group_table

            nodes = placement_group_table(self.pg).get("bundles_to_node_id") or {}
            return next(iter(nodes.values()), None)
        except Exception:  # the table is gone with the group: the failure cannot be pinned on a node
            return None

    def kill(self) -> None:
        self.state = "dead"
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # already removed with its node
                pass
