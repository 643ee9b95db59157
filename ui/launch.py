"""`make app`: start the Streamlit server and open the app in a browser, where there is one.

    python -m ui.launch [extra `streamlit run` options]

`.streamlit/config.toml` keeps `server.headless = true` on purpose: headless
off makes Streamlit ask for an e-mail address on the terminal at first start
and open a browser even where none can be shown. So the browser is opened
here instead, and only where one exists (`should_open_browser`): macOS and
Windows always, Linux and other Unixes only with a display (DISPLAY or
WAYLAND_DISPLAY; an SSH session without X forwarding has neither), or when
$BROWSER names one. MERGESCOPE_NO_BROWSER=1 turns it off. A failure to open
one is a printed line with the address, never an error.

The server is started by exec-ing `streamlit run app.py` in this process, so
it keeps this PID: SIGTERM and Ctrl-C reach it directly (ui/shutdown.py), and
the settings of .streamlit/config.toml (file watcher off) apply unchanged.
Opening the browser is left to a small detached helper process that waits
until the server answers its health check (or gives up when the server is
gone or after `READY_TIMEOUT_S`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 8501
READY_TIMEOUT_S = 180.0
# webbrowser falls back to these text-mode browsers; in a detached helper they would hang unseen
CONSOLE_BROWSERS = {"www-browser", "links", "links2", "elinks", "lynx", "w3m"}


def should_open_browser(env: Mapping[str, str] | None = None, platform: str | None = None) -> bool:
    """Whether a browser can be shown here (see the module docstring)."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    if env.get("MERGESCOPE_NO_BROWSER", "").strip().lower() in ("1", "true", "yes"):
        return False
    if env.get("BROWSER"):
        return True
    if platform == "darwin" or platform.startswith("win"):
        return True
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def server_port(args: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """The port `streamlit run` will use: --server.port in the arguments, else $STREAMLIT_SERVER_PORT, else 8501."""
    env = os.environ if env is None else env
    for i, a in enumerate(args):
        if a.startswith("--server.port="):
            return int(a.split("=", 1)[1])
        if a == "--server.port" and i + 1 < len(args):
            return int(args[i + 1])
    return int(env.get("STREAMLIT_SERVER_PORT", DEFAULT_PORT))


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _system_browser_open(url: str) -> bool:
    import webbrowser
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return False
    if getattr(browser, "name", "") in CONSOLE_BROWSERS:
        return False
    return bool(browser.open(url, new=2))


def open_when_ready(port: int, server_pid: int | None = None, timeout: float = READY_TIMEOUT_S,
                    opener: Callable[[str], bool] = _system_browser_open, healthy: Callable[[int], bool] = _healthy,
                    poll_s: float = 0.3) -> bool:
    """Wait for the server's health check, then open http://localhost:<port>. True when a browser was opened."""
    url = f"http://localhost:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_pid is not None and not _alive(server_pid):
            return False
        if healthy(port):
            try:
                opened = opener(url)
            except Exception:   # a broken browser setup must never take the app down
                opened = False
            if not opened:
                print(f"mergescope: open {url} in your browser", flush=True)
            return opened
        time.sleep(poll_s)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def streamlit_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), *args]


def main(argv: Sequence[str] | None = None, execv: Callable = os.execv, spawn: Callable = subprocess.Popen) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    port = server_port(args)
    if should_open_browser():
        spawn([sys.executable, "-c", f"from ui.launch import open_when_ready; open_when_ready({port}, {os.getpid()})"],
              cwd=str(ROOT), stdin=subprocess.DEVNULL, start_new_session=True)
    else:
        print(f"mergescope: no display here, so no browser is opened; the app will be at http://localhost:{port}",
              flush=True)
    cmd = streamlit_command(args)
    execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
