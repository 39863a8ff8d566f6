"""Ray jobs: the render farm (the nightly benchmark lives with the benchmarks it runs: benchmarks/nightly.py).

The render farm (`wanrender render manifest=FILE`), data flowing one way:

    manifest.py   YAML/JSON/CSV manifest -> validated shots (every problem at once; no Ray, no GPU)
    plan.py       shots -> resolved settings, render_hash, done/skip, priority queue, time estimate (dry_run)
    farm.py       the driver: Hydra config, Ray session, out/config.yaml, exit status
    scheduler.py  render groups pull shots from the queue; retries, timeouts, node blocklist, GPU-seconds, budget
    group.py      a render group: placement group of G bundles + G actors (one torch.distributed group)
    progress.py   live progress in the terminal
    report.py     out/report.json, the self-contained out/report.html contact sheet, out/accounting.csv
    service/      `wanrender serve`: HTTP submission service (quotas, Ray job submission, state on disk)
    report_safety.py  the contact sheet's prompt fields, held/released notes and provenance line
    safety.py     the quarantine's farm side: `wanrender release` (who, when, why; report updated)

On a multi-node cluster (cluster=ray cluster.address=HOST:6379) every node needs wanrender installed and the
output folder (out=...) on a file system all nodes share: rank 0 of each group writes there directly.
"""
