"""A fresh server as the README starts it (`streamlit run app.py`, .streamlit/config.toml as shipped):
seconds to the first rendered page and to the first heatmap after an upload, in Debian's Chromium, then
the server's CPU use while the page sits open and idle. Figures for the README ("Idle and first use").

Usage: python benchmarks/idle_and_first_use.py [--idle 60] [--image samples/NORMAL/...jpeg]
Needs /usr/bin/chromium and playwright. The server's CPU is read from /proc (Linux).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children that have been waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", type=float, default=60.0, help="seconds to leave the open page idle")
    parser.add_argument("--image", default=str(next((ROOT / "samples" / "NORMAL").glob("*.jp*g"))))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://localhost:{port}"
    report: dict = {}
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        report["server_healthy_s"] = round(time.monotonic() - started, 2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(120_000)
            t0 = time.monotonic()
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_role("heading", name="Diagnose").wait_for()
            report["first_page_s"] = round(time.monotonic() - t0, 2)
            report["first_page_since_server_start_s"] = round(time.monotonic() - started, 2)
            t0 = time.monotonic()
            page.locator('input[type="file"]').set_input_files(args.image)
            page.locator('[data-testid="stMain"] [data-testid="stMetricValue"]').first.wait_for()
            report["upload_to_probability_s"] = round(time.monotonic() - t0, 2)
            page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first.wait_for()
            report["upload_to_first_heatmap_s"] = round(time.monotonic() - t0, 2)
            page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")
            time.sleep(2)
            before = cpu_seconds(server.pid)
            time.sleep(args.idle)
            used = cpu_seconds(server.pid) - before
            report["idle_seconds"] = args.idle
            report["idle_cpu_percent_of_one_core"] = round(100 * used / args.idle, 2)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
