"""A web app for tests behind the load balancer: started and restarted by release hooks.

`python tests/webapp.py restart DIR` (what a release's post hook and failure hook run) stops the
app serving on `$APP_PORT` (SIGTERM: it finishes the requests in flight, then exits), starts a new
one in its own session serving DIR, and returns once the new one accepts connections. Between
the two there is a moment with nothing listening on the port: a request the load balancer sends
then fails, which is what the traffic choreography must prevent.

The app answers `GET /` with DIR's `index.html` (the release's text) and `GET /health` with 200,
or 500 when DIR holds a file named `unhealthy` (a release that starts but fails the load
balancer's health check). `$APP_PIDFILE` records the running app's pid, for the next restart and
for the test's cleanup.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy, Traffic

#: The hook command: restart the app on the release now behind `dest`.
RESTART = f'{sys.executable} {Path(__file__).resolve()} restart "$(readlink -f "$DEPLOYER_RELEASE_DIR/../../current")"'
#: A restart takes this long with nothing listening (a real app's stop + start).
GAP_SECONDS = 0.3


def manifest(*, traffic: str = "managed", first: tuple[str, ...] = (), restart: bool = True) -> Manifest:
    """The template of a release of the app: symlink strategy, restart after the switch and after a
    rollback (unless not `restart`: no app); `first`: post hooks that run before the restart."""
    restarts = (Hook(RESTART),) if restart else ()
    return Manifest(
        dest="/opt/api/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(post=(*(Hook(run) for run in first), *restarts), failure=restarts),
        traffic=Traffic(traffic),
    )


def template_file(path: Path, *, traffic: str = "managed", first: tuple[str, ...] = (), restart: bool = True) -> Path:
    path.write_text(manifest(traffic=traffic, first=first, restart=restart).to_yaml())
    return path


def stop(pidfile: Path) -> None:
    """SIGTERM the app of `pidfile` and wait until it exited (or it is gone already)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an app whose parent hook is gone may wait a while to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def restart(directory: Path) -> None:
    port = int(os.environ["APP_PORT"])
    pidfile = Path(os.environ["APP_PIDFILE"])
    stop(pidfile)
    time.sleep(GAP_SECONDS)
    child = subprocess.Popen(
        [sys.executable, __file__, "serve", str(directory)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pidfile.write_text(str(child.pid))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SystemExit(f"the app did not listen on {port} within 10 s")


def serve(directory: Path) -> None:
    body = (directory / "index.html").read_bytes()
    healthy = not (directory / "unhealthy").exists()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, payload = (200, body) if self.path != "/health" else (200 if healthy else 500, b"health")
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["APP_PORT"])), Handler)
    server.daemon_threads = False  # SIGTERM lets the requests in flight finish
    server.block_on_close = True

    def stop_serving(_signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop_serving)
    server.serve_forever(poll_interval=0.05)
    server.server_close()


if __name__ == "__main__":
    verb, where = sys.argv[1], Path(sys.argv[2])
    if verb == "restart":
        restart(where)
    else:
        serve(where)
