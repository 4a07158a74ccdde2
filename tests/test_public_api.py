"""The public surface: everything exported is listed, sorted, and importable."""

from __future__ import annotations

import types

import aioqueue


def test_all_is_sorted_and_complete() -> None:
    assert list(aioqueue.__all__) == sorted(aioqueue.__all__)
    public = {
        name
        for name, value in vars(aioqueue).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - {"logging"} <= set(aioqueue.__all__)
    for name in aioqueue.__all__:
        assert hasattr(aioqueue, name), name


def test_errors_form_one_tree() -> None:
    from aioqueue import errors

    for name in dir(errors):
        value = getattr(errors, name)
        if (
            isinstance(value, type)
            and issubclass(value, Exception)
            and value.__module__ == errors.__name__
        ):
            assert issubclass(value, aioqueue.AioQueueError), name
            assert name in (errors.__doc__ or ""), f"{name} missing from the drawn tree"
            assert name in aioqueue.__all__, name


def test_result_timeout_is_also_a_timeout_error() -> None:
    assert issubclass(aioqueue.ResultTimeout, TimeoutError)
