"""Where Redis is: one URL that every process passes on, for a plain server or Sentinel.

A plain server is a ``redis://`` (or ``rediss://``) URL, as redis-py reads it. A primary
found through Sentinel is a URL of promptbatch's own,

    ``redis+sentinel://[:password@]host:port,host:port,.../DB?master=NAME[&sentinel_password=P]``

built from ``PROMPTBATCH_REDIS_SENTINELS``, ``PROMPTBATCH_REDIS_SENTINEL_MASTER`` and the
password settings (``config.settings``), so that a process started with only the URL (a
worker that ``promptbatch run`` spawns, the Celery app) finds the same primary. The
password is the primary's; ``sentinel_password`` the sentinels' own (``requirepass`` in
their configuration), when they have one. Pure: parsing and formatting only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlencode

#: The scheme of a Sentinel address.
SCHEME = "redis+sentinel"
#: A sentinel's port when the address names none.
SENTINEL_PORT = 26379


class AddressError(ValueError):
    """A Sentinel address or setting that cannot be read; the message names the field."""


def parse_sentinels(text: str, field: str = "PROMPTBATCH_REDIS_SENTINELS",
                    ) -> tuple[tuple[str, int], ...]:
    """``"host:port,host:port"`` as ``((host, port), ...)`` (port 26379 when omitted)."""
    found: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, str(SENTINEL_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise AddressError(f"{field}: {item!r} is not host:port (for example "
                               "10.0.0.5:26379)")
        found.append((host.strip("[]"), int(port)))
    if not found:
        raise AddressError(f"{field} is empty: list the sentinels as host:port,host:port")
    return tuple(found)


@dataclass(frozen=True)
class SentinelAddress:
    """A primary that the sentinels ``sentinels`` know as ``master``."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)

    def url(self) -> str:
        """The address as a ``redis+sentinel://`` URL."""
        auth = ""
        if self.password is not None or self.username is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        query = {"master": self.master}
        if self.sentinel_password:
            query["sentinel_password"] = self.sentinel_password
        return f"{SCHEME}://{auth}{hosts}/{self.db}?{urlencode(query)}"

    @classmethod
    def parse(cls, url: str) -> SentinelAddress:
        """Read a ``redis+sentinel://`` URL (``AddressError`` naming what is wrong).

        A password may hold ``/``, ``?``, ``@`` or ``#`` unencoded: the sentinels' part is
        found after the ``@`` that leaves a valid ``host:port,...`` behind it. No message
        quotes anything before that ``@``."""
        scheme, sep, rest = url.partition("://")
        if scheme != SCHEME or not sep:
            raise AddressError(f"{url.split('://')[0]!r} is not a {SCHEME}:// address")
        auth, found = _split_auth(rest)
        if found is None:
            raise AddressError(
                f"the Sentinel address is not {SCHEME}://[:password@]host:port,host:port/DB"
                "?master=NAME (its text is not shown: it may hold a password)")
        username = password = None
        if auth is not None:
            user, _, pw = auth.partition(":")
            username, password = unquote(user) or None, unquote(pw)
        hosts, db, query = found.group("hosts"), found.group("db"), found.group("query")
        params = {k: v[-1] for k, v in parse_qs(query or "").items()}
        master = params.get("master", "")
        if not master:
            raise AddressError("the Sentinel address names no master: set "
                               "PROMPTBATCH_REDIS_SENTINEL_MASTER")
        db = (db or "").strip("/") or "0"
        if not db.isdigit():
            raise AddressError(f"the Sentinel address's database {db!r} is not a number")
        return cls(parse_sentinels(hosts, "the Sentinel address"), master, int(db), username,
                   password, params.get("sentinel_password") or None)

    def kombu_url(self) -> str:
        """kombu's and Celery's form: one ``sentinel://`` URL per sentinel, ``;``-joined
        (the primary's password in each; the master's name goes in the transport
        options)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return ";".join(f"sentinel://{auth}{h}:{p}/{self.db}" for h, p in self.sentinels)

    def transport_options(self) -> dict[str, object]:
        """What kombu's Sentinel channel and Celery's Sentinel backend need besides the URL."""
        options: dict[str, object] = {"master_name": self.master}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return options

    def shown(self) -> str:
        """The address without its passwords, for logs and messages."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"{SCHEME}://{hosts}/{self.db}?master={self.master}"


#: What follows a Sentinel address's credentials: the sentinels, the database, the query.
_AFTER_AUTH = re.compile(r"(?P<hosts>[^@/?]*)(?:/(?P<db>[^?]*))?(?:\?(?P<query>.*))?")
#: One sentinel: a host name, an IPv4 address or a bracketed IPv6 one, and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")


def _split_auth(rest: str) -> tuple[str | None, re.Match[str] | None]:
    """``rest`` (the address after ``://``) as its credentials (None: none) and the match
    of what follows them: the whole of it when it holds no ``@``; else, with no
    credentials or after the first ``@`` that does, sentinels, a database number and a
    master (a password may hold ``@ / ?`` unencoded). ``AddressError`` when no ``@``
    leaves a master behind but one leaves sentinels (no text of the address shown)."""
    if "@" not in rest:  # nothing to hide: a bad sentinel is named in the message
        return None, _AFTER_AUTH.fullmatch(rest)
    masterless = False
    for at in [-1, *(i for i, c in enumerate(rest) if c == "@")]:
        found = _AFTER_AUTH.fullmatch(rest, at + 1)
        if found is None or not _looks_like_hosts(found.group("hosts")):
            continue
        if not (found.group("db") or "0").isdigit():
            continue
        if "master" not in parse_qs(found.group("query") or ""):
            masterless = True
            continue
        return (None if at < 0 else rest[:at]), found
    if masterless:
        raise AddressError("the Sentinel address names no master: set "
                           "PROMPTBATCH_REDIS_SENTINEL_MASTER")
    return None, None


def _looks_like_hosts(text: str) -> bool:
    items = [item.strip() for item in text.split(",") if item.strip()]
    return bool(items) and all(_HOST.fullmatch(item) for item in items)


def is_sentinel(url: str) -> bool:
    """Whether ``url`` is a Sentinel address."""
    return url.startswith(f"{SCHEME}://")


def safe_url(url: str) -> str:
    """A URL without its passwords, for logs and messages."""
    if is_sentinel(url):
        try:
            return SentinelAddress.parse(url).shown()
        except AddressError:
            return f"{SCHEME}://***"
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
