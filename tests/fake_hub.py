"""A local HTTP server that answers like the Hugging Face hub (HF_ENDPOINT), for the download tests."""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest


class FakeHub(ThreadingHTTPServer):
    """Answers like the hub for the files in `self.repos` ({repo_id: {path: bytes}}) at any revision, or at
    only `self.revisions[repo_id]` where that is set; logs every data request."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos, self.revisions, self.log = {}, {}, []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _send(self, status, headers, data=b"", body=True):
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data)), "X-Repo-Commit": FakeHub.COMMIT}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _answer(self, body):
        hub = self.server
        path = unquote(urlsplit(self.path).path)
        if path in (
            "/api/agent-harnesses",
            "/",
        ):  # huggingface_hub's telemetry, our reachability probe: not data
            return self._send(404, {}, b"", body)
        hub.log.append((self.command, self.path))
        tree = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/[^/]+/?(.*)", path)
        resolve = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urlsplit(self.path).path)
        repo = (tree or resolve)[1] if (tree or resolve) else None
        if repo not in hub.repos:
            return self._send(404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
        files = hub.repos[repo]
        if tree:
            listing = [
                {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for p, d in sorted(files.items())
                if p.startswith(tree[2])
            ]
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(listing).encode(), body)
        revision, file = unquote(resolve[2]), unquote(resolve[3])  # a revision comes percent-encoded
        if file not in files or hub.revisions.get(repo, revision) != revision:
            return self._send(404, {"X-Error-Code": "EntryNotFound"}, b"Entry not found", body)
        data = files[file]
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if start:  # resuming an interrupted download
            s = int(start[1])
            return self._send(
                206, {**headers, "Content-Range": f"bytes {s}-{len(data) - 1}/{len(data)}"}, data[s:], body
            )
        self._send(200, headers, data, body)


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
