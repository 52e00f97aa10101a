"""Per-tenant quotas on active work: how many jobs may be queued or running, and how many evaluations they plan.

A job's planned evaluations (`JobSpec.planned_evaluations()`) are stored with it when it is created; the quota
counts every queued or running job of the tenant, whatever it has already done, so a tenant's share of the
cluster is bounded before any of it is spent. The store checks the quota inside the transaction that creates
the job, so concurrent submissions cannot slip past it together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from darwinfront.core.errors import DarwinfrontError
from darwinfront.core.settings import Settings


class QuotaExceeded(DarwinfrontError):
    """A new job would take the tenant past one of its quotas; nothing was created."""


class TooManyActiveJobs(QuotaExceeded):
    """The tenant already has as many queued and running jobs as allowed (HTTP 429: retry when one ends)."""


class EvaluationBudgetExceeded(QuotaExceeded):
    """The tenant's active jobs and the new one together plan too many evaluations (HTTP 422)."""

    field = "search"


@dataclass(frozen=True)
class Quota:
    """Limits on one tenant's active (queued + running) jobs.

    Attributes:
        max_active_jobs: Queued and running jobs a tenant may have at once.
        max_active_evaluations: Planned candidate evaluations summed over those jobs.
    """

    max_active_jobs: int
    max_active_evaluations: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Quota:
        """The quota the server's settings configure."""
        return cls(settings.max_active_jobs_per_tenant, settings.max_active_evaluations_per_tenant)

    def check(self, active: Sequence[int], planned: int) -> None:
        """Allow a new job planning `planned` evaluations next to active jobs planning `active`, or raise.

        Raises:
            TooManyActiveJobs: `len(active)` already reaches `max_active_jobs`.
            EvaluationBudgetExceeded: `sum(active) + planned` exceeds `max_active_evaluations`.
        """
        if len(active) >= self.max_active_jobs:
            raise TooManyActiveJobs(
                f"this API key's tenant already has {len(active)} queued or running jobs, the most allowed "
                f"({self.max_active_jobs}); wait for one to finish or cancel one, then retry"
            )
        in_use = sum(active)
        if in_use + planned > self.max_active_evaluations:
            if not active:
                reason = f"the job plans {planned} candidate evaluations"
            else:
                reason = (f"the job plans {planned} candidate evaluations and the tenant's {len(active)} active "
                          f"jobs already plan {in_use}")
            raise EvaluationBudgetExceeded(
                f"search: {reason}; the limit for active jobs together is {self.max_active_evaluations} "
                "(lower generations, offspring or targets, or wait for active jobs to finish)"
            )
