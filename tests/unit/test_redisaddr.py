"""The Sentinel address: parsed, formatted, refused with the field named (pure)."""

from __future__ import annotations

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
