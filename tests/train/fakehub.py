"""A local stand-in for the Hugging Face hub: the part of its HTTP API that ``hf_hub_download`` calls.

``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` answer with the headers huggingface_hub's
``get_hf_file_metadata`` reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``; no redirect, so no
``X-Linked-*``) and the file's bytes; an unknown file is a 404 with ``X-Error-Code: EntryNotFound``, as on the
hub. Every request is recorded, so a test can assert that none was made.
"""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves ``files`` ({"<repo_id>/<filename>": path}) at revision ``main`` on 127.0.0.1 while in a ``with``."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                if self.path == "/":
                    self._send(200, {}, b"", body)
                    return
                repo_and_file = self.path.lstrip("/").replace("/resolve/main/", "/", 1)
                path = hub.files.get(repo_and_file) if "/resolve/main/" in self.path else None
                if path is None:
                    self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"", body)
                    return
                data = path.read_bytes()
                etag = hashlib.sha256(data).hexdigest()  # an LFS file's ETag is its sha256
                self._send(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}, data, body)

            def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        return Handler
