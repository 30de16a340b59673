"""The Sentinel address: parsed, formatted, refused with the field named (pure)."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from config.celery import build_celery, celery_config
from config.redisaddr import AddressError, SentinelAddress, parse_sentinels, safe_url
from config.settings import Settings


def test_an_address_survives_its_url_with_passwords_that_need_quoting() -> None:
    a = SentinelAddress((("10.0.0.5", 26379), ("sentinel-b", 26380)), "pb", db=2,
                        password="p@ss:/word", sentinel_password="s&p")
    assert SentinelAddress.parse(a.url()) == a
    assert "p@ss" not in safe_url(a.url()) and "s&p" not in safe_url(a.url())
    assert safe_url(a.url()) == "redis+sentinel://10.0.0.5:26379,sentinel-b:26380/2?master=pb"


def test_sentinels_default_to_port_26379_and_bad_ones_name_the_setting() -> None:
    assert parse_sentinels("a, b:1") == (("a", 26379), ("b", 1))
    with pytest.raises(AddressError, match="PROMPTBATCH_REDIS_SENTINELS: 'a:x'"):
        parse_sentinels("a:x")
    with pytest.raises(AddressError, match="is empty"):
        parse_sentinels(" , ")


def test_settings_build_the_address_and_refuse_half_a_sentinel_setup() -> None:
    s = Settings(redis_sentinels="10.0.0.5:26379,10.0.0.6:26379", redis_sentinel_master="pb",
                 redis_password="pw", _env_file=None)  # type: ignore[call-arg]
    address = SentinelAddress.parse(s.redis_url)
    assert (address.master, address.password, len(address.sentinels)) == ("pb", "pw", 2)
    assert s.wait_replicas == 1
    plain = Settings(redis_url="redis://127.0.0.1:6379/0", _env_file=None)  # type: ignore[call-arg]
    assert plain.wait_replicas == 0
    with pytest.raises(ValidationError, match="PROMPTBATCH_REDIS_SENTINEL_MASTER"):
        Settings(redis_sentinels="a:1", _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="both set"):
        Settings(redis_sentinels="a:1", redis_sentinel_master="pb",
                 redis_url="redis://elsewhere:6379/0", _env_file=None)  # type: ignore[call-arg]


def test_celery_gets_kombus_sentinel_urls_and_the_masters_name() -> None:
    s = Settings(redis_sentinels="a:1,b:2", redis_sentinel_master="pb", redis_password="pw",
                 redis_sentinel_password="spw", _env_file=None)  # type: ignore[call-arg]
    conf = celery_config(s)
    assert conf["broker_url"] == "sentinel://:pw@a:1/0;sentinel://:pw@b:2/0"
    assert conf["result_backend"] == conf["broker_url"]
    from config.transport import SentinelTransport

    with build_celery(s).connection() as conn:
        assert type(conn.transport) is SentinelTransport
    for options in (conf["broker_transport_options"],
                    conf["result_backend_transport_options"]):
        assert options["master_name"] == "pb"
        assert options["sentinel_kwargs"] == {"password": "spw"}


@pytest.mark.parametrize("password", ["Zq7/Wk9", "Zq7?Wk9", "Zq7@Wk9/Xr?Yt", "Zq/Wk?Xr@Yt#Vu",
                                      "Zq:1?Wk", "Zq7@10.0.0.9:1/Wk"])
def test_a_raw_password_with_slash_or_question_mark_is_read_and_never_shown(
        password: str) -> None:
    url = f"redis+sentinel://:{password}@10.0.0.5:26379,sentinel-b/2?master=pb"
    a = SentinelAddress.parse(url)
    assert (a.password, a.master, a.db) == (password, "pb", 2)
    assert a.sentinels == (("10.0.0.5", 26379), ("sentinel-b", 26379))
    assert SentinelAddress.parse(a.url()) == a  # and the quoted form reads the same
    pieces = [p for p in re.split(r"[/?@#:.]", password) if len(p) >= 2 and p[0].isalpha()]
    assert not any(p in safe_url(url) or p in repr(a) for p in pieces)
    # A broken address: the message says what is wrong and shows none of the password.
    for bad in (url.replace("26379,", "26379x,"), url.replace("?master=pb", ""),
                url.replace("/2?", "/two?"), url.replace("@10.0.0.5:26379,", "@:1,")):
        with pytest.raises(AddressError) as refused:
            SentinelAddress.parse(bad)
        assert not any(p in str(refused.value) for p in pieces), str(refused.value)


def test_a_bad_sentinel_without_a_password_is_named() -> None:
    with pytest.raises(AddressError, match="'a:x' is not host:port"):
        SentinelAddress.parse("redis+sentinel://a:x/0?master=pb")
    assert SentinelAddress.parse(
        "redis+sentinel://a:1/0?master=pb&sentinel_password=s@p").sentinel_password == "s@p"
    with_auth = SentinelAddress.parse(
        "redis+sentinel://:pw@a:1/0?master=pb&sentinel_password=s@p")
    assert (with_auth.password, with_auth.sentinel_password) == ("pw", "s@p")
