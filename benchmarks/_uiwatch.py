"""A dashboard left open, for `benchmarks.placement --dashboard`: logs in with a one-time link
and keeps the overview and the job's live feeds (server-sent events) open until terminated;
prints how many events each received."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

import httpx2

from coordinator.client import Client
from coordinator.client._http import _Call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--account", required=True)
    p.add_argument("--view", action="append", default=[])
    a = p.parse_args()
    with Client(a.endpoint, a.account) as client:  # the key comes from TVM_KEY
        got = client._call(
            _Call("POST", "/ui/api/login-token", {"write": False}, parse=lambda r: r.json())
        )
    http = httpx2.Client(base_url=a.endpoint, timeout=None)
    r = http.get(got["path"])
    r.raise_for_status()
    cookie = r.headers["set-cookie"].split(";", 1)[0]
    events = dict.fromkeys(a.view, 0)
    done = threading.Event()

    def watch(view: str) -> None:
        with http.stream(
            "GET", "/ui/events", params={"view": view}, headers={"cookie": cookie}
        ) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events[view] += 1
                if done.is_set():
                    return

    for v in a.view:
        threading.Thread(target=watch, args=(v,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    print(json.dumps(events))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
