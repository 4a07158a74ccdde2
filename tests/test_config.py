"""Configuration sources, precedence, and secrets that never show."""

from __future__ import annotations

import logging

import pytest

from aioqueue import App, BrokerConnectionError, ConfigurationError
from aioqueue.config import MASK, Config, mask_url


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("redis://:s3cret@host:6379/0") == f"redis://:{MASK}@host:6379/0"
    assert mask_url("amqp://user:pw@h/vhost") == f"amqp://user:{MASK}@h/vhost"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_humanize_table_and_repr_mask_secrets() -> None:
    class Settings:
        broker_url = "redis://:hunter2@127.0.0.1:6379/3"
        key_prefix = "visible-prefix"

    app = App("masked")
    app.config_from_object(Settings)
    for text in (app.conf.humanize(), repr(app.conf), str(app.conf.table()), repr(app)):
        assert "hunter2" not in text
    assert "visible-prefix" in app.conf.humanize()
    assert app.conf.table()["broker_url"] == f"redis://:{MASK}@127.0.0.1:6379/3"


def test_keys_named_like_secrets_are_masked() -> None:
    from aioqueue.config import mask_secrets

    masked = dict(mask_secrets({"api_token": "abc", "db_password": "x", "signature_key": "k"}))
    assert set(masked.values()) == {MASK}


def test_environment_overrides_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOQUEUE_BROKER_URL", "memory://from-env")
    monkeypatch.setenv("AIOQUEUE_RESULT_TTL", "12.5")
    monkeypatch.setenv("AIOQUEUE_TRACK_STARTED", "true")
    monkeypatch.setenv("AIOQUEUE_ACCEPT_CONTENT", "json,pickle")
    app = App("env", broker="redis://127.0.0.1:6379/0", result_ttl=3)
    assert app.conf.broker_url == "memory://from-env"
    assert app.conf.result_ttl == 12.5
    assert app.conf.track_started is True
    assert app.conf.accept_content == ("json", "pickle")


def test_bad_environment_value_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOQUEUE_WORKER_CONCURRENCY", "lots")
    with pytest.raises(ConfigurationError, match="worker_concurrency"):
        Config()


def test_config_from_object_mapping_and_module_path() -> None:
    app = App("cfg")
    app.config_from_object({"RESULT_TTL": 5, "default_queue": "jobs"})
    assert app.conf.result_ttl == 5
    assert app.conf.default_queue == "jobs"
    app.config_from_object("process_tasks")  # a module with no settings changes nothing
    assert app.conf.default_queue == "jobs"
    with pytest.raises(ConfigurationError, match="cannot import"):
        app.config_from_object("no_such_config_module_here")


def test_unknown_setting_is_an_error_not_ignored() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting 'concurrency_typo'"):
        App("typo", concurrency_typo=3)
    with pytest.raises(ConfigurationError, match="unknown setting"):
        App("typo").config_from_object({"nonsense": 1})


def test_unknown_url_scheme() -> None:
    app = App("scheme", broker="kafka://somewhere")
    with pytest.raises(ConfigurationError, match="unsupported broker URL scheme 'kafka'"):
        _ = app.broker


async def test_unreachable_redis_names_url_without_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App("down", broker="redis://:topsecret@127.0.0.1:1/0", broker_connect_timeout=1)

    @app.task
    async def noop() -> None:
        return None

    caplog.set_level(logging.DEBUG)
    with pytest.raises(BrokerConnectionError) as caught:
        await noop.send()
    text = str(caught.value)
    assert "127.0.0.1:1" in text and MASK in text and "topsecret" not in text
    assert "topsecret" not in caplog.text
    await app.close()
