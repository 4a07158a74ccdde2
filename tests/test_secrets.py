"""Secrets never leak (issue 14, item 4): masked in logs, stored results, reprs and CLI output."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
import pytest
from conftest import REDIS_URL, require_server
from redis import asyncio as aioredis
from secret_app import build
from workers import TESTS_DIR, WorkerSet, worker_env

from aioqueue import App, ConfigurationError, Secret
from aioqueue.config import mask_url
from aioqueue.masking import masked_arguments

USER_PW = "PLANTED-USERPW-1a2b"
QUERY_PW = "PLANTED-QUERYPW-3c4d"
CARD = "4111-PLANTED-CARD-1111"
TOKEN = "PLANTED-TOKEN-5e6f"
SIGNING_KEY = "PLANTED-SIGNING-KEY-0123456789"
PLANTED = (USER_PW, QUERY_PW, CARD, TOKEN, SIGNING_KEY, "PLANTED")


@pytest.mark.parametrize(
    "url",
    [
        f"redis://default:{USER_PW}@127.0.0.1:6379/0",
        f"redis://:{USER_PW}@[::1]:6379/0",
        f"rediss://h:6380/0?username=u&password={QUERY_PW}&ssl_ca_certs=/ca.pem",
        f"redis://h/0?Password={QUERY_PW}",
        f"amqp://user:{USER_PW}@rabbit/vhost",
        f"amqps://user:{USER_PW}@rabbit:5671/?ssl_keyfile_password={QUERY_PW}",
        f"unix:///tmp/r.sock?password={QUERY_PW}",
        f"redis://u:{USER_PW}@h:notaport/0",
    ],
)
def test_every_url_form_is_masked(url: str) -> None:
    masked = mask_url(url)
    assert USER_PW not in masked and QUERY_PW not in masked
    app = App("m", broker=url if "amqp" in url else "memory://", result_backend=None)
    assert USER_PW not in repr(app.conf) and USER_PW not in app.conf.humanize()


def test_secret_hides_its_value_but_travels_as_it() -> None:
    token = Secret("hunter2-token")
    assert "hunter2" not in repr(token) and "hunter2" not in str(token)
    assert "hunter2" not in f"{token} {token!r} {[token]}"
    assert token.value == "hunter2-token" and token == Secret("hunter2-token")
    app = App("s")
    login = build(app).tasks["secret_app.login"]
    assert login.sensitive == frozenset({"token"}) and login.secret_params == {"token"}
    body = app.codec.encode(
        app.codec.decode(app.codec.encode(_message("secret_app.login", ("u", token))))
    )
    assert orjson.loads(body)["args"] == ["u", "hunter2-token"]


def _message(task: str, args: tuple[object, ...]) -> object:
    from aioqueue.message import Message

    return Message(id="i", task=task, queue="default", args=args)


async def test_apply_wraps_and_masks_as_a_worker_does() -> None:
    app = build(App("eager"))
    vault = await app.tasks["secret_app.vault"].apply(TOKEN)
    assert await vault.get() == f"Secret Secret('********') {len(TOKEN)}"
    declined = await app.tasks["secret_app.charge"].apply(CARD, -1)
    with pytest.raises(ValueError, match=r"card \*{8} declined") as caught:
        await declined.get()
    assert CARD not in str(caught.value)


def test_masked_arguments_is_the_one_helper_for_displays() -> None:
    app = build(App("d"))
    charge = app.tasks["secret_app.charge"]
    assert masked_arguments(charge, (CARD, 5), {}) == (("********", 5), {})
    assert masked_arguments(charge, (), {"card": CARD, "amount": 5}) == (
        (),
        {"card": "********", "amount": 5},
    )
    with pytest.raises(ConfigurationError, match="names no parameter"):

        @app.task(sensitive=("nope",))
        async def f(x: int) -> None: ...


async def test_a_real_worker_leaks_no_planted_secret(tmp_path: Path, key_prefix: str) -> None:
    """A CLI worker over Redis, at DEBUG, with secrets in its URLs, key, and task arguments
    (successes, failures, a retry): every log line, stored record and CLI output is grepped."""
    require_server(REDIS_URL, "Redis")
    broker = REDIS_URL.replace("redis://", f"redis://default:{USER_PW}@")
    backend = f"{REDIS_URL}?username=default&password={QUERY_PW}"
    env = worker_env(
        broker, key_prefix, result_backend=backend, signing_key=SIGNING_KEY, max_attempts="3"
    )
    client = build(
        App(
            "secret-app",
            broker=broker,
            backend=backend,
            key_prefix=key_prefix,
            signing_key=SIGNING_KEY,
        )
    )
    workers = WorkerSet(env, tmp_path)
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        worker = await workers.start("--loglevel", "debug", app_path="secret_app:app")
        async with client:
            tasks = client.tasks
            ok = await tasks["secret_app.charge"].send(CARD, 5)
            declined = await tasks["secret_app.charge"].send(card=CARD, amount=-1)
            welcome = await tasks["secret_app.login"].send("ann", Secret(TOKEN))
            rejected = await tasks["secret_app.login"].send("bob", Secret(TOKEN + "bad"))
            flaky = await tasks["secret_app.flaky"].send(CARD)
            vault = await tasks["secret_app.vault"].send(Secret(TOKEN))
            assert await vault.get(timeout=20) == f"Secret Secret('********') {len(TOKEN)}"
            assert await ok.get(timeout=20) == "charged"
            assert await welcome.get(timeout=20) == "welcome ann"
            for result in (declined, rejected, flaky):
                with pytest.raises(Exception) as caught:
                    await result.get(timeout=20)
                shown = f"{caught.value} {caught.value!r} {caught.value.args}"
                assert "********" in shown
                assert not [p for p in PLANTED if p in shown], shown
        await worker.end()
        records = []
        async for key in raw.scan_iter(match=f"{key_prefix}*"):
            if await raw.type(key) == b"string":
                records.append(await raw.get(key))
        assert records  # the results are there, masked
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "aioqueue.cli", "conf", "secret_app:app"),
            cwd=TESTS_DIR,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        conf_out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, conf_out
        everything = {
            "worker output": worker.output(),
            "stored records": b"\n".join(records).decode(errors="replace"),
            "conf output": conf_out.decode(errors="replace"),
        }
        assert "declined" in everything["worker output"]  # the failure was logged...
        assert "Secret('********')" in everything["worker output"]
        for where, text in everything.items():
            leaked = [p for p in PLANTED if p in text]
            assert not leaked, f"{leaked} in {where}:\n{text}"
    finally:
        await workers.close()
        keys = [k async for k in raw.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await raw.delete(*keys)
        await raw.aclose()
