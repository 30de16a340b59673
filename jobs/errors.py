"""promptbatch's exceptions: one root, one class per thing a caller can act on."""

from __future__ import annotations


class PromptBatchError(Exception):
    """Base class of every error promptbatch raises on purpose."""


class InvalidJob(PromptBatchError):
    """Raised when a job request is refused; ``errors`` lists ``(field, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]], *, line: int | None = None) -> None:
        self.errors = errors
        self.line = line
        super().__init__(_described(errors, line))

    @property
    def fields(self) -> list[str]:
        """The names of the fields at fault."""
        return [field for field, _ in self.errors]

    def without_line(self) -> InvalidJob:
        """The same error (of the same class) naming no line: one job has no line to
        name."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.line = None
        clone.args = (_described(self.errors, None),)
        return clone


def _described(errors: list[tuple[str, str]], line: int | None) -> str:
    where = f"line {line}: " if line is not None else ""
    detail = "; ".join(f"{field}: {msg}" for field, msg in errors)
    return f"{where}invalid job: {detail}"


class IdempotencyConflict(InvalidJob):
    """Raised when an idempotency key is used again with a different request (the first
    request's job keeps the key; nothing of the second is accepted)."""

    def __init__(self, key: str, job_id: str, *, line: int | None = None,
                 first_line: int | None = None) -> None:
        self.key = key
        self.job_id = job_id
        used = (f"is used by line {first_line} of the same call" if first_line is not None
                else f"was already used for job {job_id}")
        super().__init__([("idempotency_key", f"{key!r} {used} with a different request; "
                           "use a new key for a new request")], line=line)


class TenantQuotaExceeded(PromptBatchError):
    """Raised when a tenant already has ``max_pending_per_tenant`` jobs waiting."""

    def __init__(self, tenant: str, limit: int) -> None:
        self.tenant = tenant
        self.limit = limit
        super().__init__(
            f"tenant {tenant!r} already has {limit} pending jobs (max_pending_per_tenant); "
            "wait for some to finish, or raise PROMPTBATCH_MAX_PENDING_PER_TENANT"
        )


class JobNotFound(PromptBatchError):
    """Raised when a job id is unknown (or belongs to another tenant)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class AmbiguousJob(PromptBatchError):
    """Raised when an id names jobs of several tenants (their own ``client_id``), and the
    caller may read them all: it must say which tenant's it means."""

    def __init__(self, job_id: str, tenants: list[str]) -> None:
        self.job_id = job_id
        self.tenants = tenants
        super().__init__(f"{job_id!r} is the id of jobs of {len(tenants)} tenants "
                         f"({', '.join(tenants)}): name the tenant (?tenant=NAME in the "
                         "API, --tenant NAME for promptbatch status)")


class ResultTimeout(PromptBatchError):
    """Raised when a job has not finished within the time a caller was willing to wait."""


class ServiceUnavailable(PromptBatchError):
    """Raised when Redis or the SQL store cannot be reached or refuses writes."""


class SchemaBehind(PromptBatchError):
    """Raised when the job store's schema is older than this version of promptbatch needs
    (or missing): a service refuses to start until ``promptbatch migrate`` has run."""

    def __init__(self, where: str, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        found = f"at schema revision {current}" if current else "without a schema"
        super().__init__(f"the job store {where} is {found}; this promptbatch needs "
                         f"revision {head}: run `promptbatch migrate` (with the same "
                         "PROMPTBATCH_DATABASE_URL) first")


class StoreMismatch(PromptBatchError):
    """Raised when this process's job store is not the one the deployment's other
    processes use (they published theirs in Redis)."""

    def __init__(self, mine: str, theirs: str) -> None:
        super().__init__(
            f"this process's job store ({mine}) is not the one the services on this Redis "
            f"use ({theirs}); set PROMPTBATCH_DATABASE_URL to theirs (a relative SQLite "
            "path depends on the folder you start in)")


class SubmitUnconfirmed(ServiceUnavailable):
    """Raised when Redis stopped answering in the middle of a submit and the submit could
    not be undone: the jobs in ``job_ids`` are recorded and each will end in a final
    state (run, or CANCELLED if the submit's undo reached Redis late). Do not submit them
    again, unless with the same idempotency keys."""

    def __init__(self, job_ids: list[str], cause: str) -> None:
        self.job_ids = job_ids
        super().__init__(
            f"Redis did not confirm the submit ({cause}) and it could not be undone: the "
            f"{len(job_ids)} job(s) are recorded and each will end in a final state; read "
            "them by id instead of submitting them again (or resubmit with the same "
            "idempotency keys)")


class JobFailed(PromptBatchError):
    """The outcome of a job that ended FAILED (raised by ``AsyncResult.get()``)."""


class JobExpired(PromptBatchError):
    """The outcome of a job whose deadline passed before it could run."""


class JobCancelled(PromptBatchError):
    """The outcome of a job cancelled before it ran."""


class BudgetExceeded(PromptBatchError):
    """Raised when a submit's estimated cost, with what its tenant's or key's budget has
    already spent and reserved in the period, would pass that budget (HTTP 402). Nothing
    of the submit is accepted."""

    def __init__(self, scope: str, name: str, limit_usd: float, period: str,
                 spent_usd: float, reserved_usd: float, needed_usd: float,
                 resets_at: float | None) -> None:
        import time

        from jobs.money import usd

        self.scope = scope
        self.name = name
        self.limit_usd = limit_usd
        self.period = period
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.needed_usd = needed_usd
        self.resets_at = resets_at
        per = {"day": " a day", "month": " a month"}.get(period, "")
        when = {"day": " today", "month": " this month"}.get(period, "")
        who = f"tenant {name!r}" if scope == "tenant" else f"API key {name}"
        if resets_at is None:
            resets = ("it does not reset: an operator can raise it (`promptbatch tenants "
                      "budget` or `promptbatch keys budget`)")
        else:
            resets = ("it resets at "
                      + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(resets_at)))
        super().__init__(
            f"the budget of {who} is {usd(limit_usd, 2)}{per}: {usd(spent_usd, 4)} spent{when} "
            f"and {usd(reserved_usd, 4)} reserved by jobs not yet finished; this submit may "
            f"cost up to {usd(needed_usd, 4)}, which would pass it. Nothing was submitted; "
            f"{resets}")

