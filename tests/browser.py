"""Real-browser harness: headless JupyterLab, Notebook 7 or Voilà, Debian's Chromium through Playwright.

Used by ``tests/test_browser.py``, ``tests/test_voila.py``, ``tests/test_notebook7.py`` and
``benchmarks/browser.py``; ports and percentiles come from ``tests/helpers.py``. Nothing here runs at
import time. Every process started here is stopped by the object that started it (``with
JupyterLab(...)``, ``with Notebook7(...)``, ``with Voila(...)``), kernels included, even when a test
fails.

The two-notebook chat (:class:`TwoNotebooks`): one JupyterLab, two pages in one Chromium, each page
opening its own notebook (and its own workspace, so neither page restores the other's tabs) on its
own kernel; both notebooks run ``%zchat join --room ROOM --name NAME`` against ``$ZCHAT_ADDRESS``.

Delivery timing: page A records ``Date.now()`` in a capturing ``keydown`` listener when Enter is
pressed in a ``.zchat-input``; page B records ``Date.now()`` in a ``MutationObserver`` when a
``.zchat-message`` with that text is added. Both pages live in one browser on one machine, so the
two clocks are the same clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import nbformat

from .helpers import free_port, percentile

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
#: Seconds to wait for a server to answer, a kernel to start and a notebook to show its widget.
START_TIMEOUT = 90.0
#: Milliseconds Playwright waits for one message to show up in the other page.
DELIVERY_TIMEOUT_MS = 20_000

# JupyterLab settings for the test profile: no news or update toasts over the notebooks.
_LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def chromium_available() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python package playwright is missing (pip install playwright)"
    return None


def write_notebook(path: Path, cells: Sequence[str]) -> Path:
    """Write a notebook of code ``cells`` with a python3 kernelspec (so it starts without asking)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


def child_pids(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (from /proc; kernels are in their own session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may contain spaces: the fields after it are fixed.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class _WebApp:
    """A Jupyter web server in a child process (its own session), waited for and stopped with its kernels."""

    name = "server"

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root.parent / f"{root.name}-{self.name}-{self.port}.log"
        self._log: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def is_ready(self) -> bool:
        """True once the server answers ``GET /api/status`` with 200."""
        try:
            with urllib.request.urlopen(
                f"{self.base_url}/api/status?token={self.token}", timeout=5
            ) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return
            # Another process: nothing to wait on but its answer, so ask again until the deadline.
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} was not ready within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _request_shutdown(self, proc: subprocess.Popen[bytes]) -> None:
        """Ask the server to stop its kernels and exit."""
        req = urllib.request.Request(f"{self.base_url}/api/shutdown?token={self.token}", method="POST")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=10).close()

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down with its kernels; kill whatever is left. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            children = child_pids(proc.pid)  # kernels run in their own sessions: remember them
            if proc.poll() is None:
                self._request_shutdown(proc)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            for pid in children:
                _kill_and_reap(pid, timeout=10.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> _WebApp:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _kill_and_reap(pid: int, timeout: float) -> None:
    """End a grandchild (a kernel) the server did not end: SIGTERM, then SIGKILL after ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)  # not our child, so no wait(): a pidfd is readable once it exits
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        if not select.select([pidfd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


class JupyterLab(_WebApp):
    """``jupyter lab`` headless on 127.0.0.1 with a token, its own workspaces and settings directories."""

    name = "jupyterlab"

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(root, env)
        self.state = Path(tempfile.mkdtemp(prefix="zchat-lab-state-"))
        settings = self.state / "settings"
        for name, value in _LAB_SETTINGS.items():
            plugin, _, file = name.rpartition("/")
            (settings / plugin).mkdir(parents=True, exist_ok=True)
            (settings / plugin / file).write_text(json.dumps(value))

    #: ``python -m MODULE`` and the traitlets class of its app.
    module, app = "jupyterlab", "LabApp"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            self.module,
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            f"--{self.app}.workspaces_dir={self.state / 'workspaces'}",
            f"--{self.app}.user_settings_dir={self.state / 'settings'}",
            f"--{self.app}.expose_app_in_browser=True",  # window.jupyterapp, to run cells by command
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        return cmd

    def notebook_url(self, name: str, workspace: str) -> str:
        return f"{self.base_url}/lab/workspaces/{workspace}/tree/{name}?token={self.token}"

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        shutil.rmtree(self.state, ignore_errors=True)


class Notebook7(JupyterLab):
    """``jupyter notebook`` (Notebook 7) headless: the same settings as :class:`JupyterLab`, its own pages.

    Notebook 7 is built on JupyterLab's components and also exposes ``window.jupyterapp``, so
    :func:`open_notebook_and_run` drives it too (the workspace argument is ignored: one tab per page).
    """

    name = "notebook7"
    module, app = "notebook", "JupyterNotebookApp"

    def notebook_url(self, name: str, workspace: str = "") -> str:
        return f"{self.base_url}/notebooks/{name}?token={self.token}"


class Voila(_WebApp):
    """``voila NOTEBOOK`` on 127.0.0.1 with a token; one kernel per page view."""

    name = "voila"

    def __init__(self, root: Path, notebook: str, env: dict[str, str] | None = None) -> None:
        super().__init__(root, env)
        self.notebook = notebook

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "voila",
            self.notebook,
            "--no-browser",
            f"--port={self.port}",
            "--Voila.ip=127.0.0.1",
            "--Voila.port_retries=0",
            f"--token={self.token}",
        ]

    @property
    def page_url(self) -> str:
        return f"{self.base_url}/?token={self.token}"

    def is_ready(self) -> bool:
        """True once Voilà logged its address (it has no status API; its page would start a kernel)."""
        return "is running at" in self.log_tail()

    def _request_shutdown(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM: Voilà stops its loop, then shuts its kernels down (it has no shutdown API)."""
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)


# -- Chromium ---------------------------------------------------------------------------------


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium, headless (``playwright install`` cannot download a browser here)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def new_page(browser: Any, errors: list[str]) -> Any:
    """A page in its own context (own storage), 1280x900; page errors go to ``errors``."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    return page


_RUN_NOTEBOOK_JS = """async (name) => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  if (!panel || !panel.context || !panel.context.path.endsWith(name)) {
    throw new Error("the current tab is not " + name);
  }
  await panel.context.ready;
  await panel.sessionContext.ready;
  await app.commands.execute("notebook:run-all-cells");
  return panel.sessionContext.session ? panel.sessionContext.session.kernel.id : null;
}"""

_NOTEBOOK_OPEN_JS = """(name) => {
  const app = window.jupyterapp;
  const panel = app && app.shell && app.shell.currentWidget;
  return Boolean(panel && panel.context && panel.context.path.endsWith(name)
                 && panel.sessionContext && panel.sessionContext.session
                 && panel.sessionContext.session.kernel);
}"""


def open_notebook_and_run(page: Any, lab: JupyterLab, name: str, workspace: str) -> None:
    """Open ``name`` in its own workspace, run all its cells and wait until its widget is connected."""
    timeout_ms = START_TIMEOUT * 1000
    page.goto(lab.notebook_url(name, workspace), wait_until="domcontentloaded", timeout=timeout_ms)
    page.wait_for_function(_NOTEBOOK_OPEN_JS, arg=name, timeout=timeout_ms)
    page.evaluate(_RUN_NOTEBOOK_JS, name)
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # room for the notebook in screenshots
    wait_for_connected_widget(page)


def wait_for_connected_widget(page: Any) -> None:
    """Wait for a ``.zchat-widget`` whose status line says connected."""
    page.wait_for_selector(
        ".zchat-widget .zchat-status[data-status='connected']", timeout=START_TIMEOUT * 1000
    )


def set_theme(page: Any, theme: str) -> None:
    """Switch JupyterLab's theme ("JupyterLab Light" / "JupyterLab Dark") and wait until it applies."""
    light = "true" if "Light" in theme else "false"
    page.evaluate("(theme) => window.jupyterapp.commands.execute('apputils:change-theme', {theme})", theme)
    page.wait_for_selector(f"body[data-jp-theme-light='{light}']", state="attached", timeout=30_000)


# -- sending and timing -----------------------------------------------------------------------

_SENDER_PROBE_JS = """() => {
  if (window.__zchatSent) return;
  window.__zchatSent = [];
  // Capturing listener on window: runs before the widget's own keydown handler sends the text.
  window.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.key === "Enter" && !event.shiftKey && target && target.classList
        && target.classList.contains("zchat-input")) {
      window.__zchatSent.push({text: target.value, t: Date.now()});
    }
  }, true);
}"""

_RECEIVER_PROBE_JS = """() => {
  if (window.__zchatSeen) return;
  window.__zchatSeen = {};
  const note = (node) => {
    const text = node.querySelector(".zchat-text");
    const key = text ? text.innerText.trim() : "";
    if (key && !(key in window.__zchatSeen)) window.__zchatSeen[key] = Date.now();
  };
  new MutationObserver((records) => {
    for (const record of records) {
      for (const node of record.addedNodes) {
        if (node.nodeType !== 1) continue;
        if (node.classList.contains("zchat-message")) note(node);
        else node.querySelectorAll(".zchat-message").forEach(note);
      }
    }
  }).observe(document.body, {childList: true, subtree: true});
}"""


def install_probes(sender: Any, receiver: Any) -> None:
    """Start recording Enter presses in ``sender`` and message arrivals in ``receiver``."""
    sender.evaluate(_SENDER_PROBE_JS)
    receiver.evaluate(_RECEIVER_PROBE_JS)


#: A committed message in the widget (not one of its own sends still pending or not sent).
COMMITTED = ".zchat-message:not(.zchat-pending):not(.zchat-sent):not(.zchat-failed)"
#: The page's own sends not yet shown as committed.
UNSENT = ".zchat-message.zchat-pending, .zchat-message.zchat-sent, .zchat-message.zchat-failed"


def type_and_send(page: Any, text: str, timeout_ms: float = DELIVERY_TIMEOUT_MS) -> None:
    """Type ``text`` into the widget's box, press Enter, wait until it is shown as committed.

    The box clears at once; the send shows as pending until the committed message replaces it.
    """
    box = page.locator(".zchat-widget .zchat-input").first
    box.fill(text)
    box.press("Enter")
    wait_until_all_sent(page, timeout_ms)


def wait_until_all_sent(page: Any, timeout_ms: float = DELIVERY_TIMEOUT_MS) -> None:
    """Wait until the box is empty and none of the page's sends is pending (or failed)."""
    page.wait_for_function(
        """(unsent) => { const box = document.querySelector(".zchat-widget .zchat-input");
                         return box.value === "" && !document.querySelector(unsent); }""",
        arg=UNSENT,
        timeout=timeout_ms,
    )


def message_texts(page: Any) -> list[str]:
    """innerText of every committed message's ``.zchat-text`` shown in ``page``."""
    return list(page.locator(f".zchat-widget {COMMITTED} .zchat-text").all_inner_texts())


def wait_for_message(page: Any, text: str, timeout_ms: float = DELIVERY_TIMEOUT_MS) -> None:
    """Wait until a committed message whose ``.zchat-text`` innerText is ``text`` shows in ``page``."""
    page.wait_for_function(
        """([text, selector]) => [...document.querySelectorAll(selector)]
                       .some((node) => node.innerText.trim() === text)""",
        arg=[text, f".zchat-widget {COMMITTED} .zchat-text"],
        timeout=timeout_ms,
    )


def measure_delivery(sender: Any, receiver: Any, count: int = 30, tag: str = "delivery") -> dict[str, Any]:
    """Send ``count`` messages from ``sender`` one after the other; return per-message latencies (ms).

    The result has ``sent``, ``arrived`` and, when something arrived, ``p50_ms``, ``p95_ms``,
    ``max_ms``, ``min_ms`` and ``mean_ms``, plus the raw ``latencies_ms``; ``missing`` lists texts
    that never showed up in the receiver.
    """
    install_probes(sender, receiver)
    run = secrets.token_hex(3)
    texts = [f"{tag} {run} #{i:03d}" for i in range(count)]
    for text in texts:
        type_and_send(sender, text)
    missing: list[str] = []
    for text in texts:
        try:
            wait_for_message(receiver, text)
        except Exception:
            missing.append(text)
    sent = {entry["text"]: entry["t"] for entry in sender.evaluate("() => window.__zchatSent")}
    seen = receiver.evaluate("() => window.__zchatSeen")
    latencies = [seen[t] - sent[t] for t in texts if t in sent and t in seen]
    result: dict[str, Any] = {
        "sent": count,
        "arrived": count - len(missing),
        "missing": missing,
        "latencies_ms": latencies,
    }
    if latencies:
        result.update(
            p50_ms=percentile(latencies, 50),
            p95_ms=percentile(latencies, 95),
            max_ms=float(max(latencies)),
            min_ms=float(min(latencies)),
            mean_ms=sum(latencies) / len(latencies),
        )
    return result


# -- two notebooks, one room ------------------------------------------------------------------


class TwoNotebooks:
    """JupyterLab with notebooks a.ipynb (alice) and b.ipynb (bob) open in two pages of one Chromium.

    ``users`` and ``join_options`` change who joins in each (a TLS classroom passes ``--tls DIR``).

    ``address`` is the ZEO server (``host:port``) given to the kernels as ``$ZCHAT_ADDRESS``;
    ``root`` an empty directory for the notebooks (JupyterLab autosaves outputs into them).
    Use as a context manager; ``page_a``/``page_b`` are ready (widget connected) inside it.
    """

    def __init__(
        self,
        address: str,
        root: Path,
        room: str = "browser",
        users: tuple[str, str] = ("alice", "bob"),
        join_options: tuple[str, str] = ("", ""),
    ) -> None:
        self.address = address
        self.root = root
        self.room = room
        #: Who joins in a.ipynb and in b.ipynb, and what else each ``%zchat join`` gets (``--tls DIR``).
        self.users = users
        self.join_options = join_options
        self.errors: list[str] = []
        self.lab: JupyterLab | None = None
        self._playwright: Any = None
        self._manager: Any = None
        self.browser: Any = None
        self.page_a: Any = None
        self.page_b: Any = None

    def __enter__(self) -> TwoNotebooks:
        from playwright.sync_api import sync_playwright

        try:
            notebooks = zip(("a.ipynb", "b.ipynb"), self.users, self.join_options, strict=True)
            for name, user, options in notebooks:
                join = f"%zchat join --room {self.room} --name {user} {options}".rstrip()
                write_notebook(self.root / name, ["%load_ext zchat_nb", join])
            env = dict(os.environ)
            env["ZCHAT_ADDRESS"] = self.address
            env.setdefault("ZCHAT_HOME", str(self.root.parent / "zchat-home"))
            self.lab = JupyterLab(self.root, env)
            self.lab.start()
            self._manager = sync_playwright()
            self._playwright = self._manager.start()
            self.browser = launch_chromium(self._playwright)
            self.page_a = new_page(self.browser, self.errors)
            self.page_b = new_page(self.browser, self.errors)
            open_notebook_and_run(self.page_a, self.lab, "a.ipynb", "a")
            open_notebook_and_run(self.page_b, self.lab, "b.ipynb", "b")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close the browser, stop JupyterLab and its kernels. Safe to call twice."""
        if self.browser is not None:
            with contextlib.suppress(Exception):
                self.browser.close()
            self.browser = None
        if self._manager is not None:
            with contextlib.suppress(Exception):
                self._manager.__exit__(None, None, None)
            self._manager = None
        if self.lab is not None:
            self.lab.stop()
            self.lab = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def screenshot(self, path: Path) -> Path:
        """One PNG with page A (alice) on the left and page B (bob) on the right."""
        return side_by_side(path, [self.page_a, self.page_b], ["a.ipynb (alice)", "b.ipynb (bob)"])

    def pages(self) -> Iterator[Any]:
        yield self.page_a
        yield self.page_b


def side_by_side(path: Path, pages: Sequence[Any], titles: Sequence[str]) -> Path:
    """Screenshot each page and compose them left to right in one PNG (drawn by the browser itself)."""
    import base64

    shots = [base64.b64encode(page.screenshot(full_page=False)).decode() for page in pages]
    page = pages[0].context.new_page()
    try:
        figures = "".join(
            f'<figure><figcaption>{title}</figcaption><img src="data:image/png;base64,{shot}"></figure>'
            for title, shot in zip(titles, shots, strict=True)
        )
        page.set_viewport_size({"width": 1280 * len(pages) + 8 * (len(pages) + 1), "height": 900 + 40})
        page.set_content(
            "<style>body{margin:0;display:flex;gap:8px;padding:8px;background:#888;font:14px sans-serif}"
            "figure{margin:0}figcaption{color:#fff;padding:2px 0}img{width:1280px;display:block}</style>"
            + figures
        )
        page.wait_for_function("() => [...document.images].every((img) => img.complete)")
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.close()
    return path
