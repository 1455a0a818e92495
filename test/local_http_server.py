"""A real HTTP server on 127.0.0.1 for download tests: in-memory files, Range requests and injected faults."""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    body: bytes
    content_type: str = "application/octet-stream"
    # ("drop", after_bytes): hang up; ("stall", after_bytes): keep the connection open, silent; ("status", code)
    faults: list[tuple[str, int]] = field(default_factory=list)

    @property
    def etag(self) -> str:
        return '"' + hashlib.md5(self.body).hexdigest() + '"'


class LocalServer:
    """Serve ``files`` (path -> :class:`Served`) until closed; every request is recorded in ``requests``.

    ``supports_range=False`` makes it ignore ``Range`` headers, like a simple static server.
    """

    def __init__(self, supports_range: bool = True):
        self.files: dict[str, Served] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.bytes_sent = 0
        self.supports_range = supports_range
        self._lock = threading.Lock()
        self._closing = threading.Event()  # ends stalled answers when the server closes
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> Served:
        self.files[path] = Served(body, content_type)
        return self.files[path]

    def paths_requested(self) -> list[str]:
        return [path for path, _ in self.requests]

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests.append((path, self.headers.get("Range")))
                    served = server.files.get(path)
                    fault = served.faults.pop(0) if served and served.faults else None
                if served is None:
                    self.send_error(404, "no such file")
                    return
                if fault and fault[0] == "status":
                    self.send_error(fault[1])
                    return
                start = self._range_start(served)
                if start is None:
                    return
                body = served.body[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", served.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", served.etag)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(served.body) - 1}/{len(served.body)}")
                self.end_headers()
                if fault and fault[0] in ("drop", "stall"):  # promise the whole body, send part of it
                    body = body[: fault[1]]
                    self.close_connection = True
                with server._lock:  # counted before sending: the client may finish before this thread resumes
                    server.bytes_sent += len(body)
                self.wfile.write(body)
                self.wfile.flush()
                if fault and fault[0] == "stall":  # then say nothing until the server closes
                    server._closing.wait()

            def _range_start(self, served: Served) -> int | None:
                """Offset asked for (0 for the whole file); None after answering 416 itself."""
                requested = self.headers.get("Range")
                if not (server.supports_range and requested and requested.startswith("bytes=")):
                    return 0
                if_range = self.headers.get("If-Range")
                if if_range is not None and if_range != served.etag:
                    return 0
                start = int(requested[len("bytes=") :].split("-", 1)[0])
                if start >= len(served.body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(served.body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return start

        return Handler


def unused_port_url() -> str:
    """An address where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
