"""First use and idle, against the floor measured in the same run: seconds from `streamlit run` to the uploader
on screen in Debian's Chromium (and the CPU seconds the server and the browser spent to get there, which a
shared machine's load disturbs far less), for this app (`streamlit run app.py`, .streamlit/config.toml as shipped) and for
a reference app that imports torch and shows an uploader (what any torch-based Streamlit app pays), started in
turn (reference, ours, reference, ours, ...); then, in each of our runs, an upload's seconds to the probability
and to the heatmap on screen; at the end our server's CPU while the page sits open and idle. Figures for the
README ("Idle and first use").

Usage: python benchmarks/idle_and_first_use.py [--rounds 3] [--idle 60] [--image samples/NORMAL/...jpeg]
                                               [--app LABEL=CHECKOUT ...]
--app adds another checkout of this app (e.g. a `git worktree` of main: before/after in one run) to the turns.
Each server gets a fresh, empty user data and cache folder (a first use). Needs /usr/bin/chromium and
playwright; the server's CPU is read from /proc (Linux). Prints one JSON object, with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
REFERENCE_APP = '''"""The floor of any torch-based Streamlit app: import torch, show an uploader."""
import streamlit as st
import torch  # noqa: F401

st.title("Reference")
st.file_uploader("Drop chest X-rays here", accept_multiple_files=True)
'''
UPLOADER = '[data-testid="stFileUploaderDropzone"]'


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children that have been waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def browser_cpu_seconds() -> float:
    """CPU seconds of the live Chromium processes under this one (the browser, its renderers and helpers)."""
    children: dict[int, list[int]] = {}
    comm: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, rest = stat.split("(", 1)[1].rsplit(")", 1)
            children.setdefault(int(rest.split()[1]), []).append(int(entry.name))
            comm[int(entry.name)] = name
    total, todo = 0.0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if "chrom" in comm.get(pid, ""):
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_app(folder: Path) -> Path:
    """The reference app in ``folder``, with this app's .streamlit/config.toml (same server settings)."""
    (folder / ".streamlit").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / ".streamlit" / "config.toml", folder / ".streamlit" / "config.toml")
    (folder / "app.py").write_text(REFERENCE_APP)
    return folder


def first_use(browser, checkout: Path, scratch: Path, image: str | None, idle: float) -> dict:
    """One fresh server in ``checkout``: seconds to the uploader, then (with ``image``) to the probability and
    heatmap after an upload, then (with ``idle``) its CPU while the page sits open."""
    user = Path(tempfile.mkdtemp(dir=scratch))  # a first use: no decode cache, no audit log, no site registry
    env = {**os.environ, "PYTHONPATH": str(checkout), "XRAY_DATA": str(user / "data"),
           "XRAY_CACHE": str(user / "cache"), "XRAY_AUDIT_LOG": str(user / "audit.jsonl")}
    port = free_port()
    url = f"http://localhost:{port}"
    out: dict = {}
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.set_default_timeout(180_000)
    browser_before = browser_cpu_seconds()
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)],
                              cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"streamlit in {checkout} exited with {server.returncode}")
                time.sleep(0.05)
        out["server_healthy_s"] = round(time.monotonic() - started, 2)
        asked = time.monotonic()
        page.goto(url, wait_until="domcontentloaded")
        page.locator(UPLOADER).first.wait_for(state="visible")
        out["uploader_s"] = round(time.monotonic() - started, 2)
        out["uploader_after_browser_asked_s"] = round(time.monotonic() - asked, 2)
        # CPU seconds spent to get there: far less disturbed than seconds by a shared machine's load
        out["server_cpu_to_uploader_s"] = round(cpu_seconds(server.pid), 2)
        out["browser_cpu_to_uploader_s"] = round(browser_cpu_seconds() - browser_before, 2)
        if image:
            page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")  # the first run has ended
            t0, cpu0 = time.monotonic(), cpu_seconds(server.pid) + browser_cpu_seconds()
            page.locator('input[type="file"]').first.set_input_files(image)
            page.locator('[data-testid="stMain"] [data-testid="stMetricValue"]').first.wait_for()
            out["upload_to_probability_s"] = round(time.monotonic() - t0, 2)
            cpu1 = cpu_seconds(server.pid) + browser_cpu_seconds()
            page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first.wait_for()
            out["upload_to_heatmap_s"] = round(time.monotonic() - t0, 2)
            cpu2 = cpu_seconds(server.pid) + browser_cpu_seconds()
            out["cpu_upload_to_probability_s"] = round(cpu1 - cpu0, 2)
            out["cpu_probability_to_heatmap_s"] = round(cpu2 - cpu1, 2)
            out["heatmap_after_probability_s"] = round(out["upload_to_heatmap_s"] - out["upload_to_probability_s"], 2)
        if idle:
            page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")
            time.sleep(2)
            before = cpu_seconds(server.pid)
            time.sleep(idle)
            out["idle_s"] = idle
            out["idle_cpu_percent_of_one_core"] = round(100 * (cpu_seconds(server.pid) - before) / idle, 2)
    finally:
        page.close()
        server.terminate()
        server.wait(timeout=30)
    return out


def load() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="turns of each app (default 3)")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds our last page sits idle (0 = skip)")
    parser.add_argument("--image", default=str(next((ROOT / "samples" / "NORMAL").glob("*.jp*g"))),
                        help="the file uploaded in our runs (default: the first NORMAL sample)")
    parser.add_argument("--app", action="append", default=[], metavar="LABEL=CHECKOUT",
                        help="another checkout of this app to take turns with (e.g. main, for before/after)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    apps = {"reference": None, "ours": ROOT}
    for spec in args.app:
        label, _, checkout = spec.partition("=")
        apps[label] = Path(checkout).resolve()
    runs: dict[str, list[dict]] = {label: [] for label in apps}
    report: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpus": os.cpu_count(),
                    "load_before": load(), "image": args.image}
    with tempfile.TemporaryDirectory(prefix="first-use-") as tmp, sync_playwright() as p:
        scratch = Path(tmp)
        apps["reference"] = reference_app(scratch / "reference")
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            for turn in range(args.rounds):
                for label, checkout in apps.items():
                    last = turn == args.rounds - 1 and label == "ours"
                    runs[label].append(first_use(browser, checkout, scratch, None if label == "reference" else args.image,
                                                 args.idle if last else 0.0))
        finally:
            browser.close()
    report["load_after"] = load()
    report["runs"] = runs
    reference = [r["uploader_s"] for r in runs["reference"]]
    summary = {}
    reference_cpu = [r["server_cpu_to_uploader_s"] + r["browser_cpu_to_uploader_s"] for r in runs["reference"]]
    for label, rows in runs.items():
        mine = [r["uploader_s"] for r in rows]
        cpu = [round(r["server_cpu_to_uploader_s"] + r["browser_cpu_to_uploader_s"], 2) for r in rows]
        summary[label] = {"uploader_s": mine, "uploader_median_s": statistics.median(mine),
                          "cpu_to_uploader_s": cpu, "cpu_to_uploader_median_s": statistics.median(cpu)}
        if label != "reference":
            # each turn against the reference run just before it: the machine's load changes slowly
            summary[label]["ratio_to_reference_per_turn"] = [round(m / r, 2) for m, r in zip(mine, reference)]
            summary[label]["ratio_to_reference_of_medians"] = round(statistics.median(mine) / statistics.median(reference), 2)
            summary[label]["cpu_ratio_to_reference_of_medians"] = round(statistics.median(cpu) / statistics.median(reference_cpu), 2)
            gaps = [r["heatmap_after_probability_s"] for r in rows if "heatmap_after_probability_s" in r]
            if gaps:
                summary[label]["upload_to_probability_s"] = [r["upload_to_probability_s"] for r in rows]
                summary[label]["heatmap_after_probability_s"] = gaps
                summary[label]["cpu_upload_to_probability_s"] = [r["cpu_upload_to_probability_s"] for r in rows]
                summary[label]["cpu_probability_to_heatmap_s"] = [r["cpu_probability_to_heatmap_s"] for r in rows]
    report["summary"] = summary
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
