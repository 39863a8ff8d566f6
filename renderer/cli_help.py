"""`wanrender COMMAND --help`: what each command does and the overrides people reach for first (Hydra's own
--help would not know our commands, and fails on the argument list)."""

HELP = {
    "generate": """wanrender generate [overrides]: render one shot to <out>/<name>.mp4 and its sidecar <name>.json

  prompt="..."  negative_prompt="..."  seed=7  size=1280*720  frames=81  steps=40  guidance=5.0 (or [3.0,4.0])
  sampler=unipc|dpm++|euler  shift=...  image=frame.png (i2v/ti2v)  out=out/  name=shot  label=true
  model=tiny_t2v|t2v_a14b|i2v_a14b|ti2v_5b  model.checkpoint=/ckpt/Wan2.2-T2V-A14B  render.device=cuda

Every check (settings, image, checkpoint folder, output folder) runs before a model is loaded.
Multi-GPU: torchrun --nproc-per-node 4 -m renderer.cli generate parallel=gpus4 ...""",
    "render": """wanrender render manifest=FILE [overrides]: render a manifest of shots on the render farm (Ray)

  manifest=shots.yaml|.json|.csv  out=out/job  dry_run=true (the plan only; reserves nothing)
  model=... model.checkpoint=...  parallel=gpus4  cluster=local|ray  cluster.address=HOST:6379 (or RAY_ADDRESS)
  job.max_retries=2  job.shot_timeout_s=3600  job.force=true  job.lock_wait_s=0  job.shot_defaults.steps=4

Precedence: command line > shot > the manifest's defaults (each override of the manifest is printed).
One job per output folder (a lock names the job that holds it). Exit: 0 done, 1 shots failed, 2 bad input,
3 stopped by the machine (disk full, read-only folder, missing binary), 130 interrupted.""",
    "config": """wanrender config [overrides]: print the resolved configuration (nothing is loaded or rendered)

  e.g. wanrender config model=t2v_a14b parallel=gpus4""",
}
