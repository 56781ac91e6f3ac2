"""A task's error is an am.MiraiError AND an instance of the original exception's class."""

from __future__ import annotations

import pickle
import sys

import pytest

import asyncmirai as am
from asyncmirai._errors import error_class

pytestmark = pytest.mark.timeout(60)


class Custom(ValueError):
    def __init__(self, a: int, b: int) -> None:  # an __init__ with its own signature
        super().__init__(f"{a}/{b}")
        self.a, self.b = a, b


class Weird(BaseException):
    pass


def divide(a: int, b: int) -> float:
    return a / b


def raise_custom() -> None:
    raise Custom(1, 2)


def raise_oserror() -> None:
    open("/nonexistent/asyncmirai/file")


def raise_weird() -> None:
    raise Weird("not an Exception")


@pytest.fixture(params=[False, True], ids=["daemon", "sync"])
def profile(request: pytest.FixtureRequest) -> object:
    with am.daemons(1, sync=request.param) if request.param else am.daemons(1):
        yield request.param


def test_error_is_catchable_as_the_original_type(profile: object) -> None:
    m = am.mirai(divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        m.result(30)
    err = info.value
    assert isinstance(err, am.MiraiError) and isinstance(err, ArithmeticError)
    assert err.type_name == "ZeroDivisionError" and "division by zero" in err.message
    assert "divide" in err.remote_traceback
    assert type(err.__cause__) is ZeroDivisionError
    try:
        am.mirai(divide, 1, 0).result(30)
    except ZeroDivisionError as e:
        assert isinstance(e, am.MiraiError)


def test_custom_and_oserror_subclasses(profile: object) -> None:
    with pytest.raises(Custom) as info:
        am.mirai(raise_custom).result(30)
    assert isinstance(info.value, am.MiraiError) and info.value.message == "1/2"
    # Custom(1, 2) does not unpickle (its args are ("1/2",)): the class, known on the
    # host by its name, still makes the error catchable
    with pytest.raises(FileNotFoundError) as info2:
        am.mirai(raise_oserror).result(30)
    assert isinstance(info2.value, OSError) and isinstance(info2.value, am.MiraiError)
    # one cached class per original
    assert type(info2.value) is error_class(FileNotFoundError)


def test_base_exception_stays_a_plain_mirai_error() -> None:
    with am.daemons(1):
        with pytest.raises(am.MiraiError) as info:
            am.mirai(raise_weird).result(30)
    assert type(info.value) is am.MiraiError  # never a BaseException subclass
    assert info.value.type_name.endswith("Weird")


def test_dynamic_error_pickles_and_keeps_its_fields() -> None:
    with am.daemons(1):
        with pytest.raises(ZeroDivisionError) as info:
            am.mirai(divide, 1, 0).result(30)
    err = info.value
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ZeroDivisionError) and isinstance(back, am.MiraiError)
    assert (back.type_name, back.message, back.remote_traceback) == (  # type: ignore[attr-defined]
        err.type_name,  # type: ignore[attr-defined]
        err.message,  # type: ignore[attr-defined]
        err.remote_traceback,  # type: ignore[attr-defined]
    )


def test_unimportable_class_gives_plain_mirai_error() -> None:
    # a class the host cannot import: defined only in the daemon's namespace
    code = "class Gone(Exception):\n    pass\nraise Gone('only on the daemon')"
    with am.daemons(1):
        with pytest.raises(am.MiraiError) as info:
            am.mirai(code).result(30)
    assert "Gone" in info.value.type_name and "only on the daemon" in info.value.message
    assert sys.modules.get("Gone") is None
