"""``--metrics-port PORT``: the ``--metrics-textfile`` metrics, served on 127.0.0.1 for a scrape.

Where no node_exporter runs (a CI runner, a laptop, a Kubernetes Job with a Prometheus
sidecar), Prometheus scrapes the run itself. The server is the standard library's
``http.server`` in a thread: ``prometheus_client`` is only a test dependency, and the page
is the one :class:`toolkit.cli.metrics.MetricsTextfile` renders already, so there is
nothing for a client library to add. It listens on 127.0.0.1 only (the metrics name the
database; a remote Prometheus reaches it through its own agent or a tunnel), from the
moment the command line is read (so a port in use is a usage error before anything
connects) to the command's end.
"""

from __future__ import annotations

import errno
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click

from toolkit.cli.metrics import MetricsTextfile
from toolkit.cli.params import BadValue, Whole

HOST = "127.0.0.1"
PORT = Whole(1, 65535, "TCP ports stop at 65535")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format


class MetricsServer:
    """Bound when made; serves :attr:`metrics` (set once the run's sinks exist) until closed."""

    def __init__(self, port: int) -> None:
        self.metrics: MetricsTextfile | None = None
        self.lock = threading.Lock()  # rendering reads what the run's thread updates
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self.send_error(404)
                    return
                with server.lock:
                    body = (server.metrics.render() if server.metrics is not None else "").encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a scrape every 15 s is not news for the terminal

        self.http = ThreadingHTTPServer((HOST, port), Handler)
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, name="toolkit metrics",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(5)


class ServedMetrics:
    """A sink of :class:`toolkit.cli.observe.Observed`: the textfile's numbers (written to the
    file too when ``--metrics-textfile`` is given), rendered for the server under its lock."""

    def __init__(self, metrics: MetricsTextfile, server: MetricsServer) -> None:
        self.metrics, self.server = metrics, server
        server.metrics = metrics

    def record(self, name: str, fields: dict[str, Any]) -> None:
        with self.server.lock:
            self.metrics.record(name, fields)

    def close(self) -> None:
        self.metrics.close()


def serve(ctx: click.Context, param: click.Parameter, port: int | None) -> MetricsServer | None:
    """The option's callback: bind now, or refuse the port with a usage error (exit 2)."""
    if port is None:
        return None
    try:
        return MetricsServer(port)
    except OSError as exc:
        why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
        raise BadValue(f"port {port} on {HOST} {why}", "choose another port (or stop what listens "
                       "there)", param=param, ctx=ctx) from None
