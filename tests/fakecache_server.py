"""A binary cache over HTTP on 127.0.0.1, with faults to inject per test.

Serves a directory with Range support (206), and can: drop the connection in the middle of a
file once, answer 500 a few times before succeeding, flip one byte of a file, serve other bytes
in place of a file (a narinfo re-signed by another key), send slowly, leave out Content-Length,
require credentials and redirect. It counts requests.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class Faults:
    """Keys are URL paths without the leading slash, e.g. `nar/<hash>.nar.xz`."""

    drop_once: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping
    errors: dict[str, int] = field(default_factory=dict)  # path -> how many 500s are left
    flip: set[str] = field(default_factory=set)
    replace: dict[str, bytes] = field(default_factory=dict)
    bytes_per_second: int = 0  # 0: as fast as possible
    ignore_range: bool = False  # answer 200 with the whole file, as servers without Range support do
    hide_length: set[str] = field(default_factory=set)  # no Content-Length: the body ends when the connection closes
    auth: str | None = None  # the Authorization header every request must carry, else 401
    redirect: dict[str, str] = field(default_factory=dict)  # path -> URL to answer 302 with


class FakeCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults = Faults()
        self.requests: Counter[str] = Counter()
        self.ranges: list[tuple[str, str]] = []  # (path, Range header)
        self.sent: Counter[str] = Counter()  # body bytes sent per path
        self.authorization: dict[str, str | None] = {}  # path -> the Authorization header last received
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"cache": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    def start(self) -> FakeCache:
        self._thread.start()
        return self

    def __enter__(self) -> FakeCache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def nar_requests(self) -> Counter[str]:
        with self.lock:
            return Counter({p: n for p, n in self.requests.items() if p.startswith("nar/")})

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.ranges.clear()
            self.sent.clear()


class _Handler(BaseHTTPRequestHandler):
    cache: FakeCache
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        cache = self.cache
        path = self.path.split("?", 1)[0].lstrip("/")
        faults = cache.faults
        range_header = self.headers.get("Range")
        with cache.lock:
            cache.requests[path] += 1
            cache.authorization[path] = self.headers.get("Authorization")
            if range_header:
                cache.ranges.append((path, range_header))
            error = faults.errors.get(path, 0) > 0
            if error:
                faults.errors[path] -= 1
            drop_at = faults.drop_once.pop(path, None)
        if error:
            self._send(500, b"injected failure\n")
            return
        if faults.auth is not None and self.headers.get("Authorization") != faults.auth:
            self._send(401, b"who are you?\n", {"WWW-Authenticate": 'Basic realm="cache"'})
            return
        if path in faults.redirect:
            self._send(302, b"", {"Location": faults.redirect[path]})
            return
        file = cache.root / path
        if path in faults.replace:
            data = faults.replace[path]
        elif ".." in path.split("/") or not file.is_file():
            self._send(404, b"not found\n")
            return
        else:
            data = file.read_bytes()
        if path in faults.flip:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]
        start = 0
        match = None if faults.ignore_range else _RANGE.match(range_header or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
        body = data[start:]
        headers = {"Accept-Ranges": "bytes"}
        if match:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(206 if match else 200, body, headers, path=path, drop_at=drop_at,
                   length=path not in faults.hide_length)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, path: str = "",
              drop_at: int | None = None, length: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        limit = len(body) if drop_at is None else min(drop_at, len(body))
        rate = self.cache.faults.bytes_per_second
        step = max(1024, rate // 20) if rate else 1 << 16
        offset = 0
        try:
            while offset < limit:
                chunk = body[offset:min(offset + step, limit)]
                self.wfile.write(chunk)
                self.wfile.flush()
                offset += len(chunk)
                with self.cache.lock:
                    self.cache.sent[path] += len(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if drop_at is not None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
