"""Settings: secrets from files, one absolute store by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import Settings


def test_a_setting_can_come_from_a_file_named_by_its_FILE_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "redis").write_text("redis://:s3cret@redis:6379/0\n")
    (tmp_path / "keys").write_text('{"key-1": "tenant-1"}')
    monkeypatch.setenv("PROMPTBATCH_REDIS_URL_FILE", str(tmp_path / "redis"))
    monkeypatch.setenv("PROMPTBATCH_API_KEYS_FILE", str(tmp_path / "keys"))
    monkeypatch.setenv("PROMPTBATCH_OPENAI_API_KEY_FILE", str(tmp_path / "redis"))
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.redis_url == "redis://:s3cret@redis:6379/0"
    assert s.api_keys == {"key-1": "tenant-1"}
    assert s.openai_api_key.get_secret_value() == "redis://:s3cret@redis:6379/0"
    monkeypatch.setenv("PROMPTBATCH_REDIS_URL", "redis://direct:6379/0")  # the variable wins
    assert Settings(_env_file=None).redis_url == "redis://direct:6379/0"  # type: ignore[call-arg]
    monkeypatch.setenv("PROMPTBATCH_API_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError) as refused:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert "PROMPTBATCH_API_KEYS_FILE" in str(refused.value.__cause__)


def test_the_default_store_is_one_absolute_file_whatever_the_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PROMPTBATCH_DATA_DIR", "PROMPTBATCH_DATABASE_URL", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = set()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        seen.add(Settings(_env_file=None).database_url)  # type: ignore[call-arg]
    assert seen == {f"sqlite:///{tmp_path}/.local/share/promptbatch/promptbatch.db"}
