"""`wanrender serve`: an HTTP submission service in front of the render farm.

    api.py      FastAPI routes, bearer-token check, `serve` (uvicorn; an embedded Ray cluster or a given one)
    core.py     validate -> quota -> Ray job submission -> follow / cancel; progress and report from the farm's files
    quotas.py   per-project guaranteed + burst GPUs and priorities: which waiting jobs start now
    store.py    one JSON file per job under service.state_dir (a restarted service knows its jobs)

A job's Ray entrypoint is `wanrender render ...` itself; cancel reaches it as SIGINT (Ctrl-C), so it ends its groups
and writes the report. Scheduling of shots stays the farm's (jobs/scheduler.py); running jobs is Ray's job submission. The service only
decides which job may start and how many render groups it gets.
"""
