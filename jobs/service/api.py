"""The HTTP API of `wanrender serve` (FastAPI, served by uvicorn). Every route but /v1/health needs
`Authorization: Bearer <token>`; the token comes from WANRENDER_SERVICE_TOKEN (or service.token) and is compared
in constant time. There is no anonymous access.

    POST /v1/jobs                     submit {project, manifest, format, overrides, groups, priority}
                                      + header Idempotency-Key: 201 new job, 200 the job this key already made,
                                      409 key reused for another request, 422 bad manifest (every problem listed),
                                      403 over quota / unknown project (the reason)
    GET  /v1/jobs[?project=P]         the jobs, oldest first
    GET  /v1/jobs/{id}                state, reason, per-shot status / attempts / GPU-seconds / ETA, job ETA
    POST /v1/jobs/{id}/cancel         queued: cancelled at once; running: Ray stops the driver (report written)
    GET  /v1/jobs/{id}/report         report.json   (also /report.html, /accounting.csv; /logs: the driver's output)
"""
from __future__ import annotations

import hmac
import os
import sys
import threading
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from jobs.service.core import JobService, ServiceError, ServiceSettings, settings_from_config

TOKEN_ENV = "WANRENDER_SERVICE_TOKEN"
MIN_TOKEN_CHARS = 16


class SubmitRequest(BaseModel):
    project: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    manifest: str = Field(min_length=1, max_length=5_000_000, description="the manifest's text")
    format: Literal["yaml", "json", "csv"] = "yaml"
    overrides: list[str] = Field(default_factory=list, max_length=64)
    groups: int = Field(default=1, ge=1, le=1024, description="render groups; GPUs = groups × GPUs per group")
    priority: int = Field(default=0, ge=-1000, le=1000)


def create_app(service: JobService, token: str, poll_s: float = 2.0) -> FastAPI:
    stop = threading.Event()

    def poll() -> None:  # follows Ray's job states and starts queued jobs when quota frees up
        while not stop.wait(poll_s):
            try:
                service.refresh()
            except Exception as e:  # a bad poll must not kill the service; the next one retries
                print(f"wanrender service: poll failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=poll, name="wanrender-poll", daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join(timeout=poll_s + 5)

    app = FastAPI(title="wanrender submission service", version="1", lifespan=lifespan)
    bearer = HTTPBearer(auto_error=False)
    expected = token.encode("utf-8")

    def authorized(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cred is None or cred.scheme.lower() != "bearer" or not hmac.compare_digest(
                cred.credentials.encode("utf-8"), expected):
            raise HTTPException(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError):
        return JSONResponse({"error": e.message, "problems": e.problems}, status_code=e.status)

    @app.get("/v1/health")
    def health():
        return {"ok": True}

    @app.post("/v1/jobs", dependencies=[Depends(authorized)])
    def submit(body: SubmitRequest, idempotency_key: str = Header(default="")):
        rec, created = service.submit(body.project, idempotency_key, body.manifest, body.format, body.overrides,
                                      body.groups, body.priority)
        return JSONResponse(rec.public(), status_code=201 if created else 200)

    @app.get("/v1/jobs", dependencies=[Depends(authorized)])
    def list_jobs(project: str | None = None):
        return {"jobs": service.list(project)}

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(authorized)])
    def job_status(job_id: str):
        return service.status(job_id)

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=[Depends(authorized)])
    def cancel(job_id: str):
        return service.cancel(job_id).public()

    @app.get("/v1/jobs/{job_id}/report", dependencies=[Depends(authorized)])
    def report(job_id: str):
        return FileResponse(service.report_file(job_id, "report.json"), media_type="application/json")

    @app.get("/v1/jobs/{job_id}/report.html", dependencies=[Depends(authorized)])
    def report_html(job_id: str):
        return FileResponse(service.report_file(job_id, "report.html"), media_type="text/html")

    @app.get("/v1/jobs/{job_id}/logs", dependencies=[Depends(authorized)], response_class=PlainTextResponse)
    def logs(job_id: str):
        return service.logs(job_id)

    @app.get("/v1/jobs/{job_id}/accounting.csv", dependencies=[Depends(authorized)])
    def accounting_csv(job_id: str):
        return FileResponse(service.report_file(job_id, "accounting.csv"), media_type="text/csv")

    return app


def service_token(cfg_token: str | None) -> str:
    token = os.environ.get(TOKEN_ENV) or cfg_token
    if not token:
        raise ValueError(f"no service token: set {TOKEN_ENV} (or service.token); anonymous submission is not allowed")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the service token is {len(token)} characters: use at least {MIN_TOKEN_CHARS} "
                         f"(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def serve_from_config(cfg) -> int:
    """`wanrender serve`: connect to (or start) Ray's job server, then answer HTTP until stopped."""
    import ray
    import uvicorn
    from ray.job_submission import JobSubmissionClient

    try:
        token = service_token(cfg.service.get("token"))
        settings: ServiceSettings = settings_from_config(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not settings.projects:
        print("error: service.projects is empty: give each project its quota, e.g. "
              "service.projects.previs={guaranteed_gpus:4,burst_gpus:8}", file=sys.stderr)
        return 2
    address, gpus = settings.ray_address, settings.cluster_gpus
    if address is None:  # our own embedded cluster (cluster.num_gpus can fake GPUs for tests)
        ctx = ray.init(address="local", num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus,
                       include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                       logging_level="WARNING")
        address = f"http://{ctx.dashboard_url}"
        res = ray.cluster_resources()
        gpus = gpus or int(res.get("GPU", 0)) or int(res.get("CPU", 0))  # CPU-only: one slot a rank, as the farm
        print(f"wanrender service: started an embedded Ray cluster ({gpus} GPU slots), job server {address}")
    elif gpus is None:
        print(f"error: service.cluster_gpus is needed with service.ray_address={address}: the GPUs the quotas "
              f"share (e.g. service.cluster_gpus=16)", file=sys.stderr)
        return 2
    try:
        service = JobService(settings, JobSubmissionClient(address), int(gpus))
    except RuntimeError as e:  # the state folder is locked by another service
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wanrender service: http://{settings.host}:{settings.port}/v1 · state {settings.state_dir} · outputs "
          f"{settings.output_root} · {len(service.store.jobs)} known job(s) · projects "
          + ", ".join(f"{q.name} (guaranteed {q.guaranteed_gpus}, burst {q.burst_gpus}, priority {q.priority})"
                      for q in settings.projects.values()), flush=True)
    try:
        uvicorn.run(create_app(service, token, settings.poll_s), host=settings.host, port=settings.port,
                    log_level="warning")
    finally:
        service.close()
        if ray.is_initialized():
            ray.shutdown()
    return 0
