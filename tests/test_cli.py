"""CLI pieces that need no worker process (those live in test_worker_processes.py)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from aioqueue import ConfigurationError, cli
from aioqueue.cli import _loop_factory, main


def test_loop_choice() -> None:
    assert _loop_factory("asyncio") is None
    if importlib.util.find_spec("uvloop") is None:
        assert _loop_factory("auto") is None
        with pytest.raises(ConfigurationError, match="uvloop is not installed"):
            _loop_factory("uvloop")
    else:
        assert _loop_factory("uvloop") is not None


def test_conf_command_masks_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOQUEUE_BROKER_URL", "redis://:s3cr3t-pw@127.0.0.1:6379/0")
    monkeypatch.delitem(sys.modules, "examples.proj", raising=False)
    assert main(["conf", "examples.proj:app"]) == 0
    out = capsys.readouterr().out
    assert "broker_url: 'redis://:********@127.0.0.1:6379/0'" in out
    assert "s3cr3t-pw" not in out
    monkeypatch.delitem(sys.modules, "examples.proj", raising=False)


def test_bad_concurrency_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["worker", "examples.proj:app", "--concurrency", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_os_exit_only_when_thread_tasks_still_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exits: list[int] = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)
    cli._exit_past_abandoned_threads(0, 0)
    assert exits == [] and "abandoning" not in caplog.text
    cli._exit_past_abandoned_threads(1, 2)
    assert exits == [1] and "abandoning 2 thread task(s) still running" in caplog.text
