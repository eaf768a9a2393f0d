"""Checks shared by every resource: names, environment settings, ranges."""

from __future__ import annotations

import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.common.validation import RESERVED_ENV, check_env, check_name, check_range

SEED_VARS = [
    "WATASK_ACCOUNT_NAME",
    "WATASK_WORKITEM_NAME",
    "WATASK_JOB_NAME",
    "WATASK_TASK_NAME",
    "WATASK_POOL_NAME",
    "WATASK_TVM_NAME",
    "WATASK_TVM_ROOT_DIR",
    "WATASK_PORTRANGE_LOW",
    "WATASK_PORTRANGE_HIGH",
]


@pytest.mark.parametrize("name", ["a", "A-b_9", "x" * 64, "0", "-", "_"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "code", "words"),
    [
        ("", "MissingRequiredProperty", "non-empty"),
        (None, "MissingRequiredProperty", "non-empty"),
        (5, "MissingRequiredProperty", "non-empty"),
        ("x" * 65, "InvalidPropertyValue", "longer than 64"),
        ("a b", "InvalidPropertyValue", "letters, digits"),
        ("a.b", "InvalidPropertyValue", "letters, digits"),
        ("a/b", "InvalidPropertyValue", "letters, digits"),
        ("é", "InvalidPropertyValue", "letters, digits"),
        ("abc\n", "InvalidPropertyValue", "letters, digits"),
        ("\nabc", "InvalidPropertyValue", "letters, digits"),
        ("a\x00", "InvalidPropertyValue", "letters, digits"),
        ("٣", "InvalidPropertyValue", "letters, digits"),  # a Unicode digit is not an ASCII digit
    ],
)
def test_invalid_names(name, code, words):
    with pytest.raises(ApiError) as e:
        check_name(name, "poolName")
    assert e.value.status == 400
    assert e.value.code == code
    assert words in e.value.message
    assert e.value.values == {"field": "poolName"}


def _env(*pairs: tuple[str, str]) -> list[m.EnvironmentSetting]:
    return [m.EnvironmentSetting(name=n, value=v) for n, v in pairs]


def test_env_ok():
    assert check_env(_env(("A", "1"), ("B", "")), "environmentSettings") == {"A": "1", "B": ""}
    assert check_env([], "x") == {}


@pytest.mark.parametrize(
    "var",
    [
        *SEED_VARS,
        "WATASK_CERTIFICATES_DIR",
        "watask_task_name",
        "WATASK_ANYTHING",
        "AZ_BATCH_TASK_ID",
        "az_batch_node_id",
    ],
)
def test_env_reserved(var):
    with pytest.raises(ApiError) as e:
        check_env(_env(("OK", "1"), (var, "x")), "environmentSettings")
    assert e.value.status == 400
    assert e.value.code == "ReservedEnvironmentVariable"
    assert e.value.values == {"field": "environmentSettings", "name": var}
    assert var in e.value.message
    assert "environmentSettings[1]" in e.value.message


def test_every_seed_variable_is_reserved():
    assert set(SEED_VARS) <= RESERVED_ENV


@pytest.mark.parametrize("name", ["", "A=B", "A\x00", "=x"])
def test_env_bad_names(name):
    with pytest.raises(ApiError) as e:
        check_env(_env((name, "v")), "startTask.environmentSettings")
    assert (e.value.status, e.value.code) == (400, "InvalidPropertyValue")
    assert e.value.values["field"] == "startTask.environmentSettings"


def test_env_nul_in_value_refused():
    with pytest.raises(ApiError) as e:
        check_env(_env(("A", "x\x00y")), "environmentSettings")
    assert e.value.code == "InvalidPropertyValue"


def test_check_range():
    assert check_range(5, 1, 5, "maxTasksPerVM") == 5
    assert check_range(-1, -1, 5, "f") == -1
    for bad in (0, 6):
        with pytest.raises(ApiError) as e:
            check_range(bad, 1, 5, "maxTasksPerVM")
        assert (e.value.status, e.value.values) == (400, {"field": "maxTasksPerVM"})
        assert "between 1 and 5" in e.value.message
