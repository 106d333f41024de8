"""Run inside a private network namespace by test_browser_auth (``unshare -n``): serve app.py on every
interface of that namespace (which has only its own loopback), visit it once with Chromium, and print
what happened as JSON: the server's exit status, its log and the page's text."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from browser import ROOT, free_port, new_page, wait_healthy


def main(log: Path) -> dict:
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                   "--server.address", "0.0.0.0", "--server.headless", "true",
                                   "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    text = ""
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, log)
        with sync_playwright() as p:
            browser, page = new_page(p)
            try:
                page.goto(f"http://127.0.0.1:{port}", wait_until="domcontentloaded")
                try:
                    page.get_by_text("Refusing to serve").wait_for(timeout=60_000)
                except Exception:  # the server may end before the page draws: the log is the record
                    pass
                text = page.locator("body").inner_text()
            finally:
                browser.close()
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        still_running = server.poll() is None
        if still_running:
            server.kill()
        server.wait()
    return {"still_running": still_running, "returncode": server.returncode, "log": log.read_text(), "page": text}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
