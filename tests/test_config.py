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


def test_mask_url_hides_passwords_given_as_query_parameters() -> None:
    masked = mask_url("redis://host:6379/0?password=s3cret&db=2")
    assert masked == f"redis://host:6379/0?password={MASK}&db=2"
    # Any parameter named like a secret; file names and the rest are kept as written.
    url = (
        "rediss://u:pw@h/0?ssl_password=k3y&access_token=t0k&ssl_keyfile=/etc/k.pem"
        "&client_secret=shh&ssl_cert_reqs=none"
    )
    masked = mask_url(url)
    for secret in ("pw", "k3y", "t0k", "shh"):
        assert f"={secret}" not in masked and f":{secret}@" not in masked
    assert "ssl_keyfile=/etc/k.pem" in masked and "ssl_cert_reqs=none" in masked
    assert mask_url("amqp://guest@h/v?heartbeat=30") == "amqp://guest@h/v?heartbeat=30"


def test_query_password_never_shows_in_conf() -> None:
    app = App("q", broker="redis://127.0.0.1:6379/0?password=hunter2")
    for text in (app.conf.humanize(), repr(app.conf), str(app.conf.table()), repr(app)):
        assert "hunter2" not in text


async def test_unreachable_redis_with_query_password_hides_it() -> None:
    app = App("down", broker="redis://127.0.0.1:1/0?password=topsecret", broker_connect_timeout=1)

    @app.task
    async def noop() -> None:
        return None

    with pytest.raises(BrokerConnectionError) as caught:
        await noop.send()
    assert "127.0.0.1:1" in str(caught.value) and "topsecret" not in str(caught.value)
    await app.close()


def test_heartbeat_ttl_must_exceed_its_interval() -> None:
    with pytest.raises(ConfigurationError) as caught:
        App("hb", worker_heartbeat_interval=5, worker_heartbeat_ttl=5)
    assert "worker_heartbeat_ttl (5)" in str(caught.value)
    assert "worker_heartbeat_interval (5)" in str(caught.value)
    with pytest.raises(ConfigurationError, match=r"worker_heartbeat_ttl \(10"):
        App("hb", worker_heartbeat_interval=12.5)  # against the default TTL
    conf = Config()
    with pytest.raises(ConfigurationError):
        conf.update({"worker_heartbeat_ttl": 1})
    # A refused update changes nothing: the old values stay, and later updates still work.
    assert (conf.worker_heartbeat_interval, conf.worker_heartbeat_ttl) == (2.0, 10.0)
    conf.update({"worker_heartbeat_interval": 20, "worker_heartbeat_ttl": 60})
    assert (conf.worker_heartbeat_interval, conf.worker_heartbeat_ttl) == (20, 60)


def test_heartbeat_ttl_from_the_environment_is_checked_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIOQUEUE_WORKER_HEARTBEAT_TTL", "1.5")
    with pytest.raises(ConfigurationError, match="worker_heartbeat_ttl"):
        Config()


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
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEY", "k" * 32)  # pickle needs signing
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


@pytest.mark.parametrize(
    ("setting", "bad"),
    [
        ("max_attempts", 0),
        ("max_attempts", -2),
        ("max_attempts", 2.5),
        ("max_attempts", True),
        ("broker_publish_timeout", 0),
        ("broker_publish_timeout", -1.0),
        ("broker_publish_timeout", "soon"),
    ],
)
def test_limits_must_be_usable(setting: str, bad: object) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        App("limits", **{setting: bad})
