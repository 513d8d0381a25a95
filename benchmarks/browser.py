"""Browser -> browser delivery: Enter pressed in one JupyterLab notebook to the message shown in another.

Usage::

    python -m benchmarks.browser                 # from the repository root: 30 messages, one after the other
    python -m benchmarks.browser --messages 100

The harness of ``tests/test_browser.py`` (``tests/browser.py``): a hardened ZEO server in this
process (in memory), ``jupyter lab`` headless, Debian's Chromium through Playwright, two pages,
each with its own notebook on its own kernel, both joined to one room. Page A types each message
and presses Enter (the next one once A's box has cleared, i.e. after the commit); a capturing
``keydown`` listener in A notes ``Date.now()``; a ``MutationObserver`` in page B notes
``Date.now()`` when the message's element is added. Both pages are in one browser on one machine,
so the two clocks are the same clock.

The table is printed and written between ``<!-- browser:start -->`` and ``<!-- browser:end -->``
in ``benchmarks/RESULTS.md`` (the rest of that file is left as it is; ``--output`` to change the
file). Nothing here runs at import time or in the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- browser:start -->", "<!-- browser:end -->"
TARGET_P95_MS = 250.0


def measure(messages: int) -> dict[str, Any]:
    """Start server, JupyterLab and Chromium; send ``messages`` from A to B; return the timings."""
    import zchat_nb
    from tests.browser import TwoNotebooks, measure_delivery

    with tempfile.TemporaryDirectory(prefix="zchat-browser-bench-") as tmp:
        os.environ["ZCHAT_HOME"] = str(Path(tmp) / "zchat-home")  # never the user's own state
        root = Path(tmp) / "notebooks"
        root.mkdir()
        with zchat_nb.serve() as server:
            address = "{}:{}".format(*server.address)
            with TwoNotebooks(address, root, room="bench") as two:
                # One warm-up message: the first send of a kernel imports and opens what it needs.
                measure_delivery(two.page_a, two.page_b, 1, tag="warm-up")
                return measure_delivery(two.page_a, two.page_b, messages, tag="bench")


def versions() -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    chromium = subprocess.run(
        ["/usr/bin/chromium", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    libs = ", ".join(
        f"{d} {version(d)}"
        for d in ("jupyterlab", "ipykernel", "ipywidgets", "anywidget", "ZEO", "playwright")
    )
    return f"{chromium or 'chromium ?'}; {libs}"


def section(result: dict[str, Any], command: str) -> str:
    """The Markdown block for RESULTS.md, markers included."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if "p95_ms" in result:
        ok = "yes" if result["p95_ms"] <= TARGET_P95_MS and not result["missing"] else "no"
        row = (
            f"| {result['sent']} | {result['arrived']} | {result['min_ms']:.0f} | {result['p50_ms']:.0f} "
            f"| {result['p95_ms']:.0f} | {result['max_ms']:.0f} | ≤ {TARGET_P95_MS:.0f} | {ok} |"
        )
    else:
        row = f"| {result['sent']} | {result['arrived']} | — | — | — | — | ≤ {TARGET_P95_MS:.0f} | no |"
    lines = [
        START,
        "## Browser → browser delivery (JupyterLab + Chromium)",
        "",
        "Enter pressed in notebook A's widget (page A, `Date.now()` in a capturing keydown listener) to the",
        "message's element added in notebook B's widget (page B, `Date.now()` in a MutationObserver): two",
        "pages of one headless Chromium, two kernels of one `jupyter lab`, one in-memory ZEO server, all on",
        "127.0.0.1. Messages are sent one after the other (the next once A's box cleared, i.e. committed).",
        "",
        "| messages | arrived | min ms | p50 ms | p95 ms | max ms | target p95 | met |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
        row,
        "",
        f"- Measured {now} with `{command}` (commit {commit or '?'}).",
        f"- Machine: {os.cpu_count()} cores (1-min load average {result.get('load_before', 0):.1f} when it "
        f"started), {platform.system()} {platform.release()}, Python {platform.python_version()}; {versions()}.",
        END,
    ]
    return "\n".join(lines) + "\n"


def update_results(path: Path, block: str) -> None:
    """Replace the browser section of ``path`` (or append it), leaving the rest of the file alone."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30, help="messages to send from A to B (default 30)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="the RESULTS.md to update")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.browser" + (f" --messages {args.messages}" if args.messages != 30 else "")

    load = os.getloadavg()[0]
    result = measure(args.messages)
    result["load_before"] = load
    block = section(result, command)
    print(block)
    update_results(args.output, block)
    print(f"(written to {args.output})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["missing"]:
        print(f"{len(result['missing'])} message(s) never arrived: {shlex.join(result['missing'][:5])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
