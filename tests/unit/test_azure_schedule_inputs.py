"""Job schedule bodies read as the real service reads them: every ISO 8601 duration form clients
send, stored in one normal form; clear 400s naming the property."""

from __future__ import annotations

import pytest

from coordinator.common.errors import ApiError
from coordinator.core.records import VM_SIZES
from coordinator.rest.azure import schedule_inputs
from coordinator.rest.azure.body import Body


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("PT05M00S", "PT5M"),  # azure-batch 15.x
        ("PT5M", "PT5M"),
        ("PT01H30M00S", "PT1H30M"),
        ("PT1H30M", "PT1H30M"),
        ("P1D", "P1D"),
        ("P1DT12H", "P1DT12H"),
        ("P2W", "P14D"),
        ("P0DT0H10M0S", "PT10M"),  # .NET's full form
        ("PT90S", "PT1M30S"),
        ("PT01M30.5S", "PT1M30.5S"),
        ("pt5m", "PT5M"),
        ("P1M", "P30D"),  # .NET XmlConvert: a month is 30 days, a year 365
        ("P1Y", "P365D"),
        ("P10675199DT2H48M5.4775807S", "P10675199DT2H48M5.4775807S"),  # unlimited
    ],
)
def test_duration_forms(text: str, normal: str) -> None:
    assert schedule_inputs.duration(Body({"d": text}, "schedule"), "d") == normal


@pytest.mark.parametrize(
    "text", ["", "P", "PT", "5M", "PT5X", "-PT5M", "P1H", "PT1D", "every hour"]
)
def test_bad_durations_name_the_property(text: str) -> None:
    with pytest.raises(ApiError) as exc:
        schedule_inputs.duration(
            Body({"recurrenceInterval": text}, "schedule"), "recurrenceInterval"
        )
    assert exc.value.status == 400
    assert exc.value.code == "InvalidPropertyValue"
    assert exc.value.values["field"] == "schedule.recurrenceInterval"


def test_an_absent_duration_is_none() -> None:
    assert schedule_inputs.duration(Body({}, "schedule"), "startWindow") is None


def test_lifetime_jobschedule_is_the_seeds_workitem() -> None:
    body = {
        "id": "s",
        "schedule": {},
        "jobSpecification": {
            "poolInfo": {
                "autoPoolSpecification": {
                    "autoPoolIdPrefix": "pre",
                    "poolLifetimeOption": "jobSchedule",
                    "pool": {
                        "vmSize": "standard_d2s_v3",
                        "virtualMachineConfiguration": {
                            "imageReference": {
                                "publisher": "canonical",
                                "offer": "0001-com-ubuntu-server-jammy",
                                "sku": "22_04-lts",
                            },
                            "nodeAgentSKUId": "batch.node.ubuntu 22.04",
                        },
                    },
                }
            }
        },
    }
    catalogue = {k: (*v, "builtin") for k, v in VM_SIZES.items()}
    spec = schedule_inputs.schedule_add(Body(body, ""), catalogue)
    auto = spec.job_execution_environment.auto_pool_specification
    assert auto is not None
    assert auto["poolLifetimeOption"] == "workitem"
    assert auto["autoPoolNamePrefix"] == "pre"
    assert "name" not in auto["pool"]
    assert spec.azure is not None
    assert spec.azure["autoPoolSpecification"]["poolLifetimeOption"] == "jobschedule"
