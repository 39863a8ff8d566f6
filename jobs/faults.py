"""What went wrong, and what the farm does about it. Every failed attempt gets one class, kept in the report:

    input        the shot's own settings (ShotError): not retried, the next attempt would fail the same way
    environment  the machine: disk full, read-only or forbidden output folder, a missing binary. Not retried and
                 the whole job stops with the fix, because every other shot would fail the same way
    preemption   the group was lost (actor or node died, a spot instance taken back): retried, and not counted
                 against the shot's job.max_retries (up to job.max_preemptions, so a shot that kills its worker
                 every time still ends)
    render       anything else (a CUDA error, a NaN, a hang past job.shot_timeout_s): retried up to job.max_retries

Also here: the sweep of temporary files a killed job left behind, and the check that tells, after Ctrl-C,
which of the running shots had in fact finished.
"""
from __future__ import annotations

from pathlib import Path

INPUT, ENVIRONMENT, PREEMPTION, RENDER = "input", "environment", "preemption", "render"
FIXES = {
    INPUT: "fix the shot's settings and resubmit",
    ENVIRONMENT: "fix the machine (free disk space, make the output folder writable, install ffmpeg) and resubmit: "
                 "finished shots are kept and skipped",
    PREEMPTION: "retried automatically on another group",
    RENDER: "see the shot's log; retried up to job.max_retries",
}
# Ray's ways of saying "the process or node that ran this is gone" (names, so no Ray import is needed here)
_LOST = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "NodeDiedError", "WorkerCrashedError",
         "ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError")


def classify(error: BaseException) -> str:
    """The failure class of one attempt's exception (a Ray wrapper is looked through to its cause)."""
    from renderer.pipeline import ShotError
    from renderer.preflight import is_environment_error

    cause = getattr(error, "cause", None) or error
    if isinstance(cause, ShotError) or isinstance(error, ShotError):
        return INPUT
    if is_environment_error(cause) or is_environment_error(error):
        return ENVIRONMENT
    names = {t.__name__ for t in type(error).__mro__} | {t.__name__ for t in type(cause).__mro__}
    if names & set(_LOST):
        return PREEMPTION
    return RENDER


def temp_files(out_dir: Path) -> list[Path]:
    """Temporary files our atomic writers leave only when killed: '.<name>.tmp-<pid>-<rand>[.mp4]'."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.glob(".*.tmp-*") if p.is_file())


def sweep_temp_files(out_dir: Path) -> list[Path]:
    """Remove every temp file in the folder. Only safe while this job holds the folder's lock (jobs.lock): then
    no other writer can be mid-write there."""
    removed = []
    for p in temp_files(out_dir):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def finished_on_disk(planned) -> bool:
    """Whether a shot's outputs are complete on disk (MP4 read back, sidecar with the shot's render hash): a shot
    that finished just before Ctrl-C is done, whatever the driver had heard of it."""
    from jobs.plan import output_status

    done, _ = output_status(planned.mp4, planned.render_hash, planned.spec)
    return done
