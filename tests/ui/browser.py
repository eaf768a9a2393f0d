"""Headless Chromium through Selenium for the dashboard tests (skipped with a reason without it).

Selenium is blocking: tests call the browser from a worker thread (`trio.to_thread.run_sync`) while
the coordinator runs on the test's own Trio loop.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def need_browser() -> None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    if not CHROMIUM or not DRIVER:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")


def start_browser(profile_dir: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's own sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        f"--user-data-dir={profile_dir}",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER or ""), options=opts)


def wait_until(
    driver: Any, cond: Callable[[Any], Any], timeout: float = 20.0, what: str = ""
) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(StaleElementReferenceException,),
        ).until(cond)
    except TimeoutException:
        raise AssertionError(
            f"browser: timed out waiting for {what or cond}; at {driver.current_url}:\n"
            + driver.find_element("tag name", "body").text[:2000]
        ) from None


def text_of(driver: Any, css: str) -> str:
    els = driver.find_elements("css selector", css)
    return els[0].text if els else ""


def screenshot(driver: Any, name: str) -> None:
    """Saved only when TVM_UI_SCREENSHOTS names a directory (docs/make_screenshots.sh sets it)."""
    out = os.environ.get("TVM_UI_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        driver.save_screenshot(os.path.join(out, f"{name}.png"))


def click(driver: Any, css: str, what: str = "") -> None:
    """Click `css` on a page the live feed redraws: an element replaced between finding and
    clicking it is found again instead of failing the test."""

    def once(d: Any) -> bool:
        d.find_element("css selector", css).click()
        return True

    wait_until(driver, once, what=what or f"a click on {css}")
