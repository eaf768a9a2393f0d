"""The dashboard in a real headless browser against a real coordinator and agents: log in with a
one-time link, watch a pool's TVMs and a job's counts change while tasks run, read a failed task's
stderr, terminate the job, and be refused without a session (then log in with the form)."""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

import trio

from coordinator.client import task_spec
from tests.harness import cluster_ctx
from tests.ui.browser import click, need_browser, screenshot, start_browser, text_of, wait_until
from tests.ui.uihelp import login_path

JOB = "job-0000000001"


def _gated(gate: str, name: str) -> Any:
    return task_spec(name, f"sh -c 'while [ ! -e {gate} ]; do sleep 0.05; done; echo out-{name}'")


async def test_dashboard_in_a_browser(nursery, tmp_path):
    need_browser()
    marker = f"boom-{uuid.uuid4().hex[:8]}"
    gates = {n: str(tmp_path / f"gate-{n}") for n in ("g0", "g1", "g2", "g3")}
    async with cluster_ctx(nursery, tmp_path, agents=2) as c:
        c.rc.app.ui.feed.interval = 0.2  # quicker live updates for the test
        drv = await trio.to_thread.run_sync(start_browser, str(tmp_path / "chromium"))
        try:
            await _scenario(c, drv, marker, gates)
        finally:
            await trio.to_thread.run_sync(drv.quit)


async def _scenario(c: Any, drv: Any, marker: str, gates: dict[str, str]) -> None:
    run = trio.to_thread.run_sync
    base = c.rc.endpoint.rstrip("/")
    await c.pool_with_tvms("p", 2, max_tasks_per_vm=2)

    # Log in with the one-time link `tvm ui` prints: the overview shows the pool's two TVMs.
    path = await login_path(c.client, write=True)
    await run(drv.get, base + path)
    await run(
        lambda: wait_until(
            drv,
            lambda d: len(d.find_elements("css selector", '.pool[data-pool="p"] .cell')) == 2,
            what="the pool's 2 TVMs on the overview",
        )
    )
    assert c.rc.key not in await run(lambda: drv.page_source)

    # A job: a failing task first, then four that wait for their gate file.
    fail = f"{sys.executable} -c \"import sys; sys.stderr.write('{marker}\\n'); sys.exit(3)\""
    await c.client.workitems.add("wi", "p")
    await c.client.tasks.add_many(
        "wi", JOB, [task_spec("bad", fail), *(_gated(g, n) for n, g in gates.items())]
    )

    # Pool page: the TVMs turn "running" while the gated tasks hold every slot.
    await run(drv.get, f"{base}/ui/#/pool/p")
    await run(
        lambda: wait_until(
            drv,
            lambda d: (
                [e.text for e in d.find_elements("css selector", "#tvm-table td.running")]
                == ["2", "2"]
            ),
            what="both TVMs running 2 tasks on the pool page",
        )
    )
    # The live feed redraws the table every second: read it where a redrawn (stale) cell is
    # read again rather than raised.
    await run(
        lambda: wait_until(
            drv,
            lambda d: (
                [e.text for e in d.find_elements("css selector", "#tvm-table td.state")]
                == ["running", "running"]
            ),
            what="both TVMs in state running on the pool page",
        )
    )
    await run(screenshot, drv, "pool")

    # Job page: counts follow the tasks as gates open.
    await run(drv.get, f"{base}/ui/#/job/wi/{JOB}")
    await run(
        lambda: wait_until(
            drv,
            lambda d: (text_of(d, "#c-running"), text_of(d, "#c-failed")) == ("4", "1"),
            what="4 running and 1 failed",
        )
    )
    for n in ("g0", "g1"):
        open(gates[n], "w").close()  # noqa: SIM115
    await run(
        lambda: wait_until(
            drv,
            lambda d: (text_of(d, "#c-running"), text_of(d, "#c-succeeded")) == ("2", "2"),
            what="2 running and 2 succeeded after two gates opened",
        )
    )

    # Failures first in the table.
    def first_row(d: Any) -> bool:
        rows = d.find_elements("css selector", "#task-table tr[data-task]")
        return bool(rows) and rows[0].get_attribute("data-task") == "bad"

    await run(lambda: wait_until(drv, first_row, what="the failed task first in the table"))

    def kinds(d: Any) -> dict[str, str]:
        rows = d.find_elements("css selector", "#task-table tr[data-task]")
        return {r.get_attribute("data-task"): r.get_attribute("class") for r in rows}

    want = {"bad": "k-failed", "g0": "k-succeeded", "g1": "k-succeeded"}
    want.update({"g2": "k-running", "g3": "k-running"})
    await run(
        lambda: wait_until(drv, lambda d: kinds(d) == want, what="the table following the tasks")
    )
    await run(screenshot, drv, "job")

    # The failed task's page: exit code and its stderr, read from the TVM.
    await run(click, drv, 'tr[data-task="bad"] a.task-link')
    await run(
        lambda: wait_until(
            drv, lambda d: marker in text_of(d, "#stderr"), what="the failed task's stderr"
        )
    )
    assert await run(text_of, drv, "#task-exit") == "3"
    assert "failed" in await run(text_of, drv, "#task-state")
    await run(screenshot, drv, "task")

    # Terminate the job from its page: the waiting tasks end, the job leaves "active".
    await run(drv.get, f"{base}/ui/#/job/wi/{JOB}")
    await run(
        lambda: wait_until(
            drv,
            lambda d: d.find_elements("css selector", "#terminate-job"),
            what="terminate button",
        )
    )

    def terminate() -> None:
        click(drv, "#terminate-job")
        wait_until(drv, lambda d: d.switch_to.alert, what="the confirmation").accept()

    await run(terminate)
    await run(
        lambda: wait_until(
            drv,
            lambda d: (
                text_of(d, "#job-state") in ("terminating", "completed")
                and text_of(d, "#c-running") == "0"
            ),
            what="the job terminated with nothing running",
        )
    )
    assert (await c.client.jobs.get("wi", JOB)).state in ("terminating", "completed")

    # The two terminated tasks count as failed beside the one that exited 3.
    # Throughput page (placements happened: the total is shown).
    await run(drv.get, f"{base}/ui/#/throughput")
    await run(
        lambda: wait_until(
            drv, lambda d: text_of(d, "#tp-placements") not in ("", "0"), what="placements"
        )
    )
    await run(screenshot, drv, "throughput")
    await run(drv.get, f"{base}/ui/#/")
    await run(
        lambda: wait_until(drv, lambda d: text_of(d, "#t-failed") == "3", what="overview totals")
    )
    await run(screenshot, drv, "overview")

    # Without a session: every page sends the browser to the login form, the data stays away.
    await run(drv.delete_all_cookies)
    await run(drv.get, f"{base}/ui/#/job/wi/{JOB}")
    await run(
        lambda: wait_until(
            drv, lambda d: d.find_elements("css selector", "#key"), what="the login form"
        )
    )
    assert "/ui/login" in await run(lambda: drv.current_url)
    await run(drv.get, f"{base}/ui/api/view/overview")
    assert "NotLoggedIn" in await run(lambda: drv.page_source)
    await run(drv.get, f"{base}/ui/login")
    await run(screenshot, drv, "login")

    # The login form with the key: a read-only session (no action buttons).
    def form_login() -> None:
        drv.find_element("css selector", "#key").send_keys(c.rc.key)
        drv.find_element("css selector", "#login").click()
        wait_until(drv, lambda d: "read-only" in text_of(d, "#who"), what="a read-only session")

    await run(form_login)
    await run(drv.get, f"{base}/ui/#/job/wi/{JOB}")
    await run(
        lambda: wait_until(
            drv, lambda d: text_of(d, "#c-failed") == "3", what="job page, read-only"
        )
    )
    assert await run(lambda: drv.find_elements("css selector", "#terminate-job")) == []
    assert os.path.exists(gates["g0"])
