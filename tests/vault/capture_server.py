"""A real local HTTP server standing in for a processor: it records every request it receives
(method, path, headers, body) and answers with a JSON echo of the body, as a careless processor
might, so a test can see exactly what the vault sent and what it let back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class CaptureServer:
    url: str
    received: list[Received] = field(default_factory=list)


@contextmanager
def capture_server() -> Iterator[CaptureServer]:
    server_box: list[CaptureServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            server_box[0].received.append(Received(self.command, self.path, headers, body))
            answer = orjson.dumps({"id": "pi_captured", "status": "requires_capture", "echo": body.decode()})
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            return  # keep the test output clean: the test asserts on `received` instead

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_box.append(CaptureServer(f"http://127.0.0.1:{httpd.server_address[1]}"))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_box[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
