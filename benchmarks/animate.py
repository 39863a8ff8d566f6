"""The Animate benchmark: one DiT forward against the floor, one clip end to end, a 4-clip shot — on 1 or N GPUs.

    python -m benchmarks.animate bench=animate_14b_720p out=out/animate                          # one GPU
    torchrun --standalone --nproc-per-node 2 -m benchmarks.animate bench=animate_14b_720p layout=ulysses2 \\
        out=out/animate                                                                          # two GPUs
    python -m benchmarks.animate bench=animate_smoke out=out/animate_smoke                      # CPU smoke (tests)
    python -m benchmarks.animate bench=animate_14b_720p_draft out=out/animate_draft             # draft tier

Config: conf/bench/<bench>.yaml through benchmarks.scaling.load_config (Hydra overrides). Full-size random bf16
weights (speed does not depend on the values). What is measured, in one process group, in this order:
  1. ceilings: a large bf16 matmul and the best attention kernel at this token count (benchmarks/profile_step.py);
  2. forward: the Animate DiT on one clip's latent (1280×720×77 -> 21 latent frames incl. the reference, 75,600
     tokens), median of `forward_reps` after a warm-up; FLOPs counted per part -> floor = Σ FLOPs / ceiling;
  3. clip: conditioning.render_animate on one 77-frame clip, every stage device-timed (CLIP, VAE encodes,
     denoise, decode). With timed_steps = K < steps the clip runs K steps and the 20-step figure is projected as
     (clip − denoise) + median step × steps — the JSON says which;
  4. shot: `shot_clips` chained clips (4 × 76 + 1 = 305 frames for refert 1), same projection.
`quality=draft` (the config's `tier`; conf/bench/animate_14b_720p_draft.yaml): the draft tier as an Animate shot
runs it (conf/quality/draft.yaml, families.animate: 4 Euler steps on the distilled schedule, shift 5, guidance 1).
No LoRA file is needed at random weights: a random rank-64 LoRA in the Wan2.1-I2V 4-step file's layout (every block
linear incl. k_img / v_img, diff_b, norm diffs, diff_m) is merged and the merge timed; EVERY step of the clip is
timed (nothing projected).
The text encoder is not loaded (its embedding is computed once per shot; random embeddings stand in), so the
T5's 11 GB and its ~0.3 s are outside these figures. Rank 0 writes <out>/<name>.json and .md with the seed
article's claim rows and the design note beside the measurements.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

CLAIM_NOTE = ("The seed article's '540 s on one RTX 4090 vs 68 s on 8×A100 at 720p' matches no Animate source: 534.7 s "
              "is the official TI2V-5B 720p row on one 4090, 68 s is LightX2V's 4-step distilled Wan2.1-I2V 480p time "
              "on one 4090. A 720p Animate clip needs ≥ 800 s on a 4090 even at 100 % of its bf16 peak, and 34.5 GB "
              "of weights do not fit 24 GB.")
CLAIM_ROWS = [{"source": "seed article (claim)", "setup": "1× RTX 4090, 720p", "seconds": 540.0},
              {"source": "seed article (claim)", "setup": "8× A100, 720p", "seconds": 68.0}]


def animate_flops(cfg, tokens: int, image_tokens: int = 257) -> dict[str, float]:
    """FLOPs of one Animate forward (multiply-add = 2): the Wan backbone plus image cross-attention, pose
    embedding and the face blocks (the motion/face encoders are per clip, not per forward)."""
    from benchmarks.profile_step import count_flops

    n, d, li = tokens, cfg.dim, image_tokens
    base = count_flops(cfg, 1, n, cfg.num_layers)
    img_attn = cfg.num_layers * 4 * n * li * d
    img_lin = cfg.num_layers * 2 * li * 2 * d * d + 2 * li * (cfg.image_dim * cfg.image_dim + cfg.image_dim * d)
    face = cfg.num_face_blocks * (2 * n * 2 * d * d + 4 * n * (cfg.face_heads + 1) * d)
    pose = 2 * n * d * math.prod(cfg.patch_size) * cfg.latent_channels
    out = dict(base)
    out["cross_attention"] += img_attn
    out["linear"] += img_lin + face + pose
    out["total"] += img_attn + img_lin + face + pose
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(frames: int, h: int, w: int, face: int, mode: str = "animate", seed: int = 0):
    from renderer.families.animate.conditioning import AnimateInputs

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    return AnimateInputs(mode, r(3, h, w), r(3, frames, h, w), r(3, frames, face, face))


def _models(preset, device, dtype):
    from renderer.encoders.clip import CLIPVisionConfig, CLIPVisionEncoder
    from renderer.families.animate.model import build_animate
    from renderer.vae import build_vae

    model = build_animate(preset.dit, dtype=dtype, device=device, seed=0)
    vae_dtype = dtype if device.type == "cuda" else torch.float32
    vae = build_vae("2.1", tiny=preset.vae.tiny, dtype=vae_dtype, device=device, seed=0)
    clip_dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        clip = CLIPVisionEncoder(CLIPVisionConfig(**preset.extra["clip"])).to(clip_dtype).eval()
    return model, vae, clip


def bench_tier(cfg: dict):
    """The quality tier the benchmark runs (exact or draft), as an Animate shot runs it."""
    from renderer.tiers import load_tier

    q = cfg.get("tier") or "exact"
    name, overrides = (q.get("name", "draft"), {k: v for k, v in q.items() if k != "name"}) if isinstance(q, dict) \
        else (str(q), None)
    if name != "exact":  # quality_overrides: the scaling harness's fields of the non-exact tiers
        overrides = {**(cfg.get("quality_overrides") or {}), **(overrides or {})}
    tier = load_tier(name, overrides).for_family("animate")
    if tier.name == "fast":
        raise ValueError("quality=fast is not available for Animate (no step cache / FP8 in the clip loop)")
    return tier


def random_draft_lora(model, rank: int = 64, seed: int = 0):
    """A random LoRA shaped like the Wan2.1-I2V 4-step file for `model` (same modules and delta kinds), its factors
    in the weights' dtype on the weights' device: what a merge at load time costs, without the file."""
    from renderer.lora import LoraLayer, LoraWeights

    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    mods = dict(model.named_modules())
    lora = LoraWeights(f"random rank-{rank} (Wan2.1-I2V 4-step layout)")
    parts = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
             "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")
    norms = ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
             "cross_attn.norm_k_img", "norm3")

    def rnd(like, *shape):
        return torch.randn(*shape, generator=g, device=like.device, dtype=like.dtype) * 0.01

    for i in range(len(model.blocks)):
        for part in parts:
            w = mods[f"blocks.{i}.{part}"].weight  # [out, in]
            lora.layers[f"blocks.{i}.{part}"] = LoraLayer(down=rnd(w, rank, w.shape[1]), up=rnd(w, w.shape[0], rank),
                                                          alpha=float(rank), diff_b=rnd(w, w.shape[0]))
        for part in norms:
            n = mods[f"blocks.{i}.{part}"].weight
            lora.layers[f"blocks.{i}.{part}"] = LoraLayer(diff=rnd(n, *n.shape))
        m = mods[f"blocks.{i}"].modulation
        lora.layers[f"blocks.{i}"] = LoraLayer(diff_m=rnd(m, *m.shape))
    return lora


def run(cfg: dict) -> dict:
    from benchmarks.profile_step import measure_ceilings, timed
    from renderer.families.animate.conditioning import AnimateSettings, render_animate
    from renderer.presets import ModelPreset

    preset = ModelPreset.from_dict(cfg["model"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = None
    if world > 1:
        from renderer.parallel import ParallelConfig, init_group
        from renderer.parallel.launch import PARALLEL_CONF  # conf/parallel

        import yaml

        layout = cfg.get("layout") or f"ulysses{world}"
        pcfg = ParallelConfig.from_dict(yaml.safe_load((PARALLEL_CONF / f"{layout}.yaml").read_text()))
        pcfg.validate(world, preset.dit.num_heads)
        group = init_group(pcfg, "nccl" if torch.cuda.is_available() else "gloo")
    device = group.device if group is not None else torch.device(
        "cuda" if torch.cuda.is_available() and cfg["render"]["device"] != "cpu" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    main = group is None or group.is_main
    say = (lambda m: print(m, flush=True)) if main else (lambda m: None)

    tier = bench_tier(cfg)
    model, vae, clip = _models(preset, device, dtype)
    merge = None
    if tier.loras:  # the draft: merge a random LoRA of the real file's layout (before parallelising, as load_stack)
        from renderer.lora import merge_loras

        lora = random_draft_lora(model, rank=int(cfg.get("lora_rank", 64)))
        _sync(device)
        t_merge = time.perf_counter()
        merge_loras(model, [(lora, 1.0)])
        _sync(device)
        merge = {"seconds": time.perf_counter() - t_merge, "modules": len(lora.layers),
                 "rank": lora.describe()["ranks"]}
        del lora
        say(f"merged a random rank-{merge['rank'][0]} LoRA into {merge['modules']} modules in {merge['seconds']:.2f} s")
    if group is not None and group.distributed:
        model = group.parallelize_experts([model])[0]
    shot = cfg["shot"]
    width, height = (int(v) for v in str(shot["size"]).split("*"))
    clip_len, steps, refert = int(shot["frames"]), int(shot["steps"]), int(cfg.get("refert_num", 1))
    sampler, shift, guidance = "unipc", preset.shift, 1.0
    if tier.name != "exact":  # the tier fixes the schedule; every step is timed (a few-step clip is never projected)
        steps, sampler, shift = tier.steps or steps, tier.sampler or sampler, tier.shift or shift
        guidance = float(tier.guidance if isinstance(tier.guidance, (int, float)) else 1.0)
    k = steps if tier.name != "exact" else int(cfg.get("timed_steps") or steps)
    g = torch.Generator().manual_seed(0)
    text, null = torch.randn(1, 512, preset.dit.text_dim, generator=g), torch.randn(1, 512, preset.dit.text_dim)
    text, null = text.to(device, dtype), null.to(device, dtype)
    face = preset.dit.motion_size
    from renderer.provenance import code_version, provenance

    report = {"name": cfg.get("name"), "code_version": code_version(), "provenance": provenance(),
              "command": " ".join(sys.argv), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": preset.name, "gpus": world, "parallel": cfg.get("layout"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "size": shot["size"], "clip_len": clip_len,
              "steps": steps, "timed_steps": k, "refert_num": refert, "claims": CLAIM_ROWS, "claim_note": CLAIM_NOTE,
              "quality": tier.describe(), "sampler": sampler, "shift": shift, "guidance": guidance,
              "lora_merge": merge}

    # 1–2. ceilings and one forward
    zt = clip_len // 4 + 1
    h, w = height // 8, width // 8
    tokens = (zt + 1) * (h // 2) * (w // 2)
    x = torch.randn(1, preset.dit.in_dim, zt + 1, h, w, generator=g).to(device)
    pose = torch.randn(1, 16, zt, h, w, generator=g).to(device)
    faces = (torch.rand(1, 3, clip_len, face, face, generator=g) * 2 - 1).to(device, dtype)
    with torch.no_grad():
        from renderer.parallel.parallelize import is_sharded

        feats = torch.randn(1, 257, preset.dit.image_dim, generator=g).to(device, dtype)
        if is_sharded(model):
            kw = dict(face=faces, image_features=feats)
        else:
            kw = dict(motion=model.encode_face(faces), image_context=model.encode_image(feats))
        fwd = lambda: model(x, torch.tensor([900.0], device=device), text, pose=pose, **kw)  # noqa: E731
        say(f"forward: {tokens} tokens, warm-up")
        fwd()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        secs = timed(fwd, device, int(cfg.get("forward_reps", 3)))
    flops = animate_flops(preset.dit, tokens)
    ceil = measure_ceilings(preset.dit, device, dtype, 1, tokens)
    attn = flops["self_attention"] + flops["cross_attention"]
    floor = (attn / (ceil["attention_best_tflops"] * 1e12) + flops["linear"] / (ceil["matmul_tflops"] * 1e12)) / world
    fwd_s = statistics.median(secs)
    report["forward"] = {"tokens": tokens, "seconds": secs, "median_s": fwd_s, "pflop": flops["total"] / 1e15,
                         "floor_s": floor, "x_floor": fwd_s / floor, "ceilings": ceil,
                         "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
                         else None}
    say(f"forward {fwd_s:.3f} s, floor {floor:.3f} s (×{fwd_s / floor:.2f})")

    # 3–4. one clip and a chained shot, every stage timed
    from renderer.denoise import denoise

    runs = [("clip", 1)] + ([("shot", int(cfg["shot_clips"]))] if int(cfg.get("shot_clips") or 0) else [])
    for label, n_clips in runs:
        frames = n_clips * (clip_len - refert) + refert
        timings: dict[str, float] = {}
        step_s: list[float] = []
        every_step_s: list[float] = []  # all steps, step 0 included (timed from the start of its clip's denoise)
        last = [time.perf_counter()]

        def timed_denoise(*a, **kw):
            _sync(device)
            last[0] = time.perf_counter()
            return denoise(*a, **kw)

        def on_step(i, t, e):
            # synchronise after EVERY step, the first too: resetting the clock after step 0 without a sync charged
            # the rest of step 0's queued GPU work to step 1 (seen on an H200: 15.7 s "steps" of an 11.2 s forward)
            _sync(device)
            now = time.perf_counter()
            every_step_s.append(now - last[0])
            if i:  # step 0 is a warm-up (first use of this clip's shapes); steps 1.. are timed
                step_s.append(now - last[0])
            last[0] = now

        s = AnimateSettings(clip_len=clip_len, refert_num=refert, steps=k, shift=shift, sampler=sampler,
                            guidance=guidance)
        t0 = time.perf_counter()
        render_animate(model, vae, clip, _inputs(frames, height, width, face), text, null, s,
                       torch.Generator().manual_seed(1), group=group, timings=timings,
                       on_step=on_step, denoise_fn=timed_denoise)
        total = time.perf_counter() - t0
        med_step = statistics.median(step_s) if step_s else timings["denoise"] / (k * n_clips)
        projected = total - timings["denoise"] + med_step * steps * n_clips
        overhead = projected - med_step * steps * n_clips
        report[label] = {"clips": n_clips, "frames": frames, "measured_s": total, "timings_s": timings,
                         "steps_s": every_step_s,
                         "median_step_s": med_step, "projected_s": projected,
                         "projection": "measured" if k >= steps else f"scaled from {k} of {steps} steps",
                         "overhead_s": overhead, "overhead_pct": 100 * overhead / projected}
        say(f"{label}: {n_clips} clip(s), {projected:.1f} s for {steps} steps ({report[label]['projection']}), "
            f"overhead {100 * overhead / projected:.1f} %")
    if device.type == "cuda":
        report["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if group is not None:
        group.close()
    return report if main else {}


def markdown(r: dict) -> str:
    f, c, s = r["forward"], r["clip"], r.get("shot")
    q = (r.get("quality") or {}).get("name", "exact")
    lines = [f"# {r['name']}: {r['model']} on {r['gpus']}× {r['device']} ({r.get('parallel') or 'single'})", "",
             f"{r['size']}, clips of {r['clip_len']} frames, {r['steps']} steps ({r.get('sampler', 'unipc')}, shift "
             f"{r.get('shift', 5.0):g}, guidance {r.get('guidance', 1.0):g}), refert {r['refert_num']}, quality {q}, "
             f"{r['dtype']}, random weights", "",
             "| measure | seconds | note |", "|---|---|---|",
             f"| one forward | {f['median_s']:.3f} | floor {f['floor_s']:.3f} s (×{f['x_floor']:.2f}), "
             f"{f['pflop']:.2f} PFLOP, {f['tokens']} tokens |",
             f"| one clip end to end | {c['projected_s']:.1f} | {c['projection']}; overhead {c['overhead_pct']:.1f} %; "
             f"steps {', '.join(f'{x:.2f}' for x in c['steps_s'])} s |"]
    if r.get("lora_merge"):
        m = r["lora_merge"]
        lines.append(f"| LoRA merge at load | {m['seconds']:.2f} | random rank {m['rank'][0]}, "
                     f"{m['modules']} modules |")
    if s:
        lines.append(f"| {s['clips']}-clip shot ({s['frames']} frames) | {s['projected_s']:.1f} | {s['projection']} |")
    lines += [f"| {x['setup']} ({x['source']}) | {x['seconds']:.0f} | not measured here |" for x in r["claims"]]
    lines += ["", r["claim_note"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.scaling import load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    bench = next((a.split("=", 1)[1] for a in argv if a.startswith("bench=")), "animate_14b_720p")
    # `quality=draft` names the tier (the config key is `tier`: `quality` is the renderer's config group)
    overrides = [("tier=" + a.split("=", 1)[1]) if a.startswith("quality=") else a for a in argv
                 if not a.startswith("bench=")]
    try:
        cfg = load_config(bench, overrides)
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run(cfg)
    if report:
        out = Path(cfg["out"])
        out.mkdir(parents=True, exist_ok=True)
        stem = report["name"] or "animate"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (out / f"{stem}.md").write_text(markdown(report))
        print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
