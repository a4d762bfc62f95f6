"""Actions on jobs (retry, revoke): what a handler is, and how it reports back."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

from sluice_core.model import Job


class ActionRefused(Exception):
    """The action cannot be done faithfully; the message says why and what to do.

    The API answers 409 with it (e.g. retrying a job whose arguments are only
    known as a truncated repr).
    """


@attrs.frozen
class ActionResult:
    job_id: str
    action: str  # "retry" or "revoke"
    new_job_id: str | None = None  # the new job's id, for a retry


class ActionHandler(Protocol):
    framework: str

    def handles(self, job: Job) -> bool:
        """True if this handler can act on ``job`` (its framework and broker)."""

    async def retry(self, job: Job) -> ActionResult:
        """Re-run ``job`` with its original arguments as a new job. Raise ActionRefused."""

    async def revoke(self, job: Job, *, terminate: bool, signal: str) -> ActionResult:
        """Ask the workers to discard ``job`` (and kill it if ``terminate``)."""


@runtime_checkable
class RevokesMany(Protocol):
    """Optional for a handler: revoke several jobs with one broker message.

    A bulk revoke uses it, when the handler has it, for all the jobs it handles.
    """

    async def revoke_many(
        self, jobs: list[Job], *, terminate: bool, signal: str
    ) -> list[ActionResult]:
        """Like ``revoke`` for each job, at once; one result per job, in order."""
