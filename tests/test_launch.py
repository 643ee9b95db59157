"""`make app` (ui/launch.py): a browser is opened where one can be shown, never where none can, and the
server is `streamlit run app.py` exec'd in place (so SIGTERM reaches it directly)."""
from __future__ import annotations

import http.server
import os
import socket
import sys
import threading

import pytest

from ui import launch


@pytest.mark.parametrize("env, platform, expected", [
    ({}, "linux", False),                                   # headless box, SSH without X forwarding
    ({"DISPLAY": ":0"}, "linux", True),
    ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", True),
    ({"BROWSER": "firefox"}, "linux", True),                # the user named one
    ({}, "darwin", True),
    ({}, "win32", True),
    ({"DISPLAY": ":0", "MERGESCOPE_NO_BROWSER": "1"}, "linux", False),
    ({"MERGESCOPE_NO_BROWSER": "1"}, "darwin", False),
])
def test_should_open_browser(env, platform, expected):
    assert launch.should_open_browser(env, platform) is expected


def test_server_port_from_arguments_environment_or_default():
    assert launch.server_port([], {}) == 8501
    assert launch.server_port(["--server.port", "8600"], {}) == 8600
    assert launch.server_port(["--server.port=8700"], {}) == 8700
    assert launch.server_port([], {"STREAMLIT_SERVER_PORT": "8800"}) == 8800


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/_stcore/health" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_open_when_ready_opens_once_the_server_answers():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        opened = []
        assert launch.open_when_ready(port, os.getpid(), timeout=10, opener=lambda url: opened.append(url) or True)
        assert opened == [f"http://localhost:{port}"]
    finally:
        server.shutdown()


def test_open_when_ready_never_fails(capsys):
    with socket.socket() as s:          # a port nobody serves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert launch.open_when_ready(port, timeout=0.5, poll_s=0.05, opener=lambda url: True) is False
    # a server that answers, but no usable browser: a printed address, no exception
    broken = launch.open_when_ready(port, timeout=5, healthy=lambda p: True, opener=lambda url: 1 / 0)
    assert broken is False and f"http://localhost:{port}" in capsys.readouterr().out
    # the server died before answering: the helper gives up at once
    assert launch.open_when_ready(port, server_pid=2 ** 22 + 12345, timeout=30, healthy=lambda p: False) is False


def test_main_execs_streamlit_and_spawns_the_helper_only_with_a_display(monkeypatch):
    calls = {}
    monkeypatch.setattr(launch, "should_open_browser", lambda: True)
    launch.main(["--server.port", "8600"], execv=lambda exe, cmd: calls.setdefault("exec", cmd),
                spawn=lambda cmd, **kw: calls.setdefault("spawn", (cmd, kw)))
    assert calls["exec"][:4] == [sys.executable, "-m", "streamlit", "run"]
    assert calls["exec"][4].endswith("app.py") and calls["exec"][5:] == ["--server.port", "8600"]
    helper, kw = calls["spawn"]
    assert "open_when_ready(8600" in helper[-1] and kw["start_new_session"]
    calls.clear()
    monkeypatch.setattr(launch, "should_open_browser", lambda: False)
    launch.main([], execv=lambda exe, cmd: calls.setdefault("exec", cmd),
                spawn=lambda cmd, **kw: calls.setdefault("spawn", cmd))
    assert "exec" in calls and "spawn" not in calls
