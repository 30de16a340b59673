"""SQL records beside the jobs: API keys, uploaded files and OpenAI-style batches."""

from __future__ import annotations

import builtins
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from jobs.store import Base, JobStore


class ApiKeyRow(Base):
    """An API key (its SHA-256) and the tenant it belongs to."""

    __tablename__ = "api_keys"

    key_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    #: An admin key may act for any tenant (submit in their name, read their jobs).
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The key's first characters, shown by ``keys list`` and accepted by ``keys revoke``.
    prefix: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


#: Characters of a key kept as its prefix ("pb-" and eight more).
PREFIX_CHARS = 11
#: A key's last use is written at most this often (seconds), not on every request.
LAST_USED_EVERY_S = 60.0


class KeyError_(LookupError):
    """A key to revoke that is unknown, or a prefix that names several keys."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A stored key as ``keys list`` shows it (never the key itself)."""

    prefix: str
    tenant: str
    admin: bool
    created_at: float
    last_used_at: float | None
    expires_at: float | None
    revoked_at: float | None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class FileRow(Base):
    """An uploaded file (OpenAI Files API), a batch's listing of its jobs or its output."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_created", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column("bytes", Integer)
    created_at: Mapped[float] = mapped_column(Float)
    content: Mapped[builtins.bytes] = mapped_column(LargeBinary)


class BatchRow(Base):
    """An OpenAI-style batch: its JSON record (jobs, counts, status, file ids)."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_created", "tenant", "created_at"),
                      Index("ix_batches_created", "created_at", "id"),
                      Index("ix_batches_input_file", "input_file_id"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    data: Mapped[str] = mapped_column(Text)
    #: The file the batch was made from (retention keeps it while the batch is open).
    input_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


def key_hash(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _info(r: ApiKeyRow) -> KeyInfo:
    return KeyInfo(r.prefix or "(unknown)", r.tenant, bool(r.admin), r.created_at,
                   r.last_used_at, r.expires_at, r.revoked_at)


class Accounts:
    """API keys, files and batches in the job store's database."""

    def __init__(self, store: JobStore) -> None:
        self.engine = store.engine
        self._used: dict[str, float] = {}

    def tenant_of(self, key: str, now: float | None = None) -> tuple[str, bool] | None:
        """``(tenant, admin)`` of a key, or None for an unknown, revoked or expired key
        (read from SQL on every call: a revocation holds at once in every process)."""
        found = self.holder_of(key, now)
        return None if found is None else (found[0], found[1])

    def holder_of(self, key: str, now: float | None = None,
                  ) -> tuple[str, bool, str | None] | None:
        """``(tenant, admin, prefix)`` of a key (see ``tenant_of``)."""
        now = time.time() if now is None else now
        digest = key_hash(key)
        with self.engine.connect() as conn:
            row = conn.execute(select(ApiKeyRow.tenant, ApiKeyRow.admin, ApiKeyRow.prefix).where(
                ApiKeyRow.key_sha256 == digest, ApiKeyRow.revoked_at.is_(None),
                or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > now))).first()
        if row is None:
            return None
        if now - self._used.get(digest, 0.0) >= LAST_USED_EVERY_S:
            self._used[digest] = now
            with self.engine.begin() as conn:
                conn.execute(update(ApiKeyRow).where(ApiKeyRow.key_sha256 == digest)
                             .values(last_used_at=now))
        return str(row[0]), bool(row[1]), None if row[2] is None else str(row[2])

    def add_key(self, key: str, tenant: str, admin: bool = False,
                expires_at: float | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(ApiKeyRow.__table__.insert(), [{  # type: ignore[attr-defined]
                "key_sha256": key_hash(key), "tenant": tenant, "created_at": time.time(),
                "admin": admin, "prefix": key[:PREFIX_CHARS], "expires_at": expires_at}])

    def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        """Every stored key (of ``tenant``), oldest first."""
        stmt = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
        if tenant is not None:
            stmt = stmt.where(ApiKeyRow.tenant == tenant)
        with Session(self.engine) as session:
            return [_info(r) for r in session.scalars(stmt)]

    def refusal(self, key: str, now: float | None = None) -> str | None:
        """Why a stored key is refused, for its holder: revoked or expired, and when; None
        for a key the store does not hold (or that works)."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            row = conn.execute(select(ApiKeyRow.revoked_at, ApiKeyRow.expires_at).where(
                ApiKeyRow.key_sha256 == key_hash(key))).first()
        if row is None:
            return None
        revoked_at, expires_at = row
        if revoked_at is not None:
            return (f"this API key was revoked on {_utc(revoked_at)}; ask the operator of "
                    "this service for a new key")
        if expires_at is not None and expires_at <= now:
            return (f"this API key expired on {_utc(expires_at)}; ask the operator of this "
                    "service for a new key")
        return None

    def revoke(self, key_or_prefix: str, now: float | None = None) -> KeyInfo:
        """Revoke one key, named by itself or by its prefix (``KeyError_`` when none or
        several match). A prefix is 6 to ``PREFIX_CHARS`` characters and matches exactly:
        case counts, and ``_`` and ``%`` are characters like the others."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            rows = conn.execute(select(ApiKeyRow.key_sha256).where(
                ApiKeyRow.key_sha256 == key_hash(key_or_prefix))).all()
            if not rows and 6 <= len(key_or_prefix) <= PREFIX_CHARS:
                rows = conn.execute(select(ApiKeyRow.key_sha256).where(
                    func.substr(ApiKeyRow.prefix, 1, len(key_or_prefix)) == key_or_prefix,
                    ApiKeyRow.revoked_at.is_(None))).all()
            if not rows:
                raise KeyError_(f"no key is {key_or_prefix!r} or starts with it (a prefix is "
                                f"6 to {PREFIX_CHARS} characters; `promptbatch keys list` "
                                "shows them)")
            if len(rows) > 1:
                raise KeyError_(f"{len(rows)} keys start with {key_or_prefix!r}: give more of "
                                "it, or the whole key")
            digest = rows[0][0]
            conn.execute(update(ApiKeyRow).where(ApiKeyRow.key_sha256 == digest)
                         .values(revoked_at=now))
        with Session(self.engine) as session:
            return _info(session.get_one(ApiKeyRow, digest))

    def rotate(self, tenant: str, new_key: str, grace_s: float, admin: bool = False,
               now: float | None = None) -> int:
        """Add ``new_key`` for ``tenant``; the tenant's other active keys of the same kind
        (admin or not) expire ``grace_s`` from now (sooner if they already did). Returns
        how many were given that grace."""
        now = time.time() if now is None else now
        until = now + grace_s
        with self.engine.begin() as conn:
            done = conn.execute(update(ApiKeyRow).where(
                ApiKeyRow.tenant == tenant, ApiKeyRow.admin == admin,
                ApiKeyRow.revoked_at.is_(None),
                or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > until))
                .values(expires_at=until))
        self.add_key(new_key, tenant, admin)
        return int(done.rowcount)

    def has_prefix(self, prefix: str) -> bool:
        """Whether a stored key has exactly this prefix (a key's budget is named by it)."""
        with self.engine.connect() as conn:
            return conn.execute(select(ApiKeyRow.key_sha256).where(
                ApiKeyRow.prefix == prefix).limit(1)).first() is not None

    def prefix_of(self, key_or_prefix: str) -> str | None:
        """The prefix of the stored key that is ``key_or_prefix`` or has it as its whole
        prefix (what names a key's budget), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(ApiKeyRow.prefix).where(
                ApiKeyRow.key_sha256 == key_hash(key_or_prefix))).first()
        if row is not None:
            return str(row[0])
        return key_or_prefix if self.has_prefix(key_or_prefix) else None

    def count_keys(self, tenant: str | None = None) -> int:
        """API keys stored (of ``tenant``)."""
        stmt = select(func.count()).select_from(ApiKeyRow)
        if tenant is not None:
            stmt = stmt.where(ApiKeyRow.tenant == tenant)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def put_file(self, file_id: str, tenant: str, purpose: str, filename: str,
                 content: bytes) -> dict[str, Any]:
        row = {"id": file_id, "tenant": tenant, "purpose": purpose, "filename": filename,
               "bytes": len(content), "created_at": time.time(), "content": content}
        with self.engine.begin() as conn:
            conn.execute(FileRow.__table__.insert(), [row])  # type: ignore[attr-defined]
        return row

    def get_file(self, file_id: str, tenant: str) -> FileRow | None:
        with Session(self.engine) as session:
            return session.scalars(select(FileRow).where(
                FileRow.id == file_id, FileRow.tenant == tenant)).first()

    def list_files(self, tenant: str, limit: int, after: str | None,
                   purpose: str | None = None) -> list[tuple[str, int, float, str, str]]:
        """The tenant's files, newest first: ``(id, bytes, created_at, filename,
        purpose)`` (never their content), after the file ``after``."""
        stmt = select(FileRow.id, FileRow.size, FileRow.created_at, FileRow.filename,
                      FileRow.purpose).where(FileRow.tenant == tenant)
        if purpose:
            stmt = stmt.where(FileRow.purpose == purpose)
        with self.engine.connect() as conn:
            if after:
                created = conn.execute(select(FileRow.created_at).where(
                    FileRow.id == after, FileRow.tenant == tenant)).scalar_one_or_none()
                if created is not None:
                    stmt = stmt.where(FileRow.created_at < created)
            rows = conn.execute(stmt.order_by(FileRow.created_at.desc()).limit(limit))
            return [(str(i), int(n), float(at), str(f), str(p)) for i, n, at, f, p in rows]

    def delete_file(self, file_id: str, tenant: str) -> bool:
        """Delete one of the tenant's files; whether it was there."""
        with self.engine.begin() as conn:
            done = conn.execute(FileRow.__table__.delete().where(  # type: ignore[attr-defined]
                FileRow.id == file_id, FileRow.tenant == tenant))
        return bool(done.rowcount)

    def put_batch(self, batch_id: str, tenant: str, data: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(BatchRow.__table__.insert(), [{  # type: ignore[attr-defined]
                "id": batch_id, "tenant": tenant, "created_at": data["created_at"],
                "data": json.dumps(data), "input_file_id": data.get("input_file_id")}])

    def update_batch(self, batch_id: str, data: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(BatchRow.__table__.update().where(  # type: ignore[attr-defined]
                BatchRow.id == batch_id).values(data=json.dumps(data)))

    def get_batch(self, batch_id: str, tenant: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            raw = conn.execute(select(BatchRow.data).where(
                BatchRow.id == batch_id, BatchRow.tenant == tenant)).scalar_one_or_none()
        return json.loads(raw) if raw else None

    def batch_states(self, tenant: str, batch_id: str) -> dict[str, int]:
        """Jobs of a Batch API batch per state, counted in SQL (one range of an index on
        ``(tenant, idempotency_key)``: the batch's jobs carry ``{batch id}:`` keys). The
        range is in byte order (``:`` just before ``;``): on PostgreSQL under the "C"
        collation, whatever the database's (en_US sorts ``;`` before ``:``, and the range
        would be empty), through the index migration 0007 makes for it."""
        from jobs.store import JobRow

        key = JobRow.idempotency_key
        if self.engine.dialect.name == "postgresql":
            key = key.collate("C")  # type: ignore[assignment]
        stmt = (select(JobRow.state, func.count()).where(
            JobRow.tenant == tenant, key >= f"{batch_id}:", key < f"{batch_id};")
            .group_by(JobRow.state))
        with self.engine.connect() as conn:
            return {str(state): int(n) for state, n in conn.execute(stmt)}

    def list_batches(self, tenant: str, limit: int, after: str | None) -> list[dict[str, Any]]:
        stmt = select(BatchRow.data).where(BatchRow.tenant == tenant)
        if after:
            with self.engine.connect() as conn:
                created = conn.execute(select(BatchRow.created_at).where(
                    BatchRow.id == after, BatchRow.tenant == tenant)).scalar_one_or_none()
            if created is not None:
                stmt = stmt.where(BatchRow.created_at < created)
        stmt = stmt.order_by(BatchRow.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [json.loads(r) for r in conn.execute(stmt).scalars()]
