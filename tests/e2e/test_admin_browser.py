"""The admin in a real headless Chromium: log in, reboot a running server from the server list,
see it ACTIVE again, and keep screenshots of the list and of the capacity dashboard."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from testbed import REPO
from testbed.stack import Stack
from tests.e2e.test_lifecycle import create, settle, wait_booted

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("CLOUDCTL_ARTIFACTS_DIR", REPO / "artifacts"))


def test_reboot_from_the_admin_server_list(stack: Stack) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is not installed (tools/install-system.sh)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server_id = create(stack, "browser-demo")
    settle(stack, server_id, "ACTIVE")
    wait_booted(stack, server_id, 1)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{stack.url}/admin/login/?next=/admin/compute/instance/")
            page.fill("#id_username", "admin")
            page.fill("#id_password", "e2e-password")
            page.click("input[type=submit]")
            page.wait_for_url("**/admin/compute/instance/")
            row = page.locator("#result_list tbody tr", has_text="browser-demo")
            row.locator("input.action-select").check()
            page.select_option("select[name=action]", "reboot_soft")
            page.click("button[name=index]")
            page.wait_for_selector("ul.messagelist")
            assert "Browser-demo: reboot (soft) accepted" in page.inner_text("ul.messagelist")

            deadline = time.monotonic() + 90
            status = ""
            while time.monotonic() < deadline:
                page.goto(f"{stack.url}/admin/compute/instance/?q=browser-demo")
                status = page.locator("#result_list tbody tr", has_text="browser-demo") \
                    .locator("td.field-status_shown").inner_text()
                if status == "ACTIVE":
                    break
                time.sleep(0.5)
            assert status == "ACTIVE", f"server list shows {status!r}"
            page.screenshot(path=str(ARTIFACTS / "admin-servers.png"), full_page=True)

            page.goto(f"{stack.url}/admin/dashboard/")
            assert page.locator(f"#host-{stack.host}").count() == 1
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    stack.api("DELETE", f"/api/v1/servers/{server_id}/")
