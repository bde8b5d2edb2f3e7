"""A small stand-in for the Hugging Face Hub: the routes huggingface_hub 2.4.0 calls for ``create_repo``,
``create_commit`` (README validation, preupload -- every file "regular", so no LFS / Xet transfer -- and the NDJSON
commit), ``list_repo_tree``, ``create_branch``, ``repo_info`` and a file's content (``/<repo>/resolve/<rev>/<path>``). Threaded, in-process; records every request and
keeps every branch's files (path -> bytes) so tests compare them with what was exported.

    with HubStub() as hub:   # hub.url -> HF_ENDPOINT
        ...
        hub.repos["org/name"].branches["main"]["config.json"]
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    commits: int = 0


@dataclass
class Request:
    method: str
    path: str
    query: dict
    auth: str | None
    body: bytes


class HubStub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, payload, headers: dict | None = None):
                raw = isinstance(payload, bytes)  # a file's content (the resolve route)
                data = payload if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str):
                url = urlparse(self.path)
                body = self._body() if method == "POST" else b""
                with stub.lock:
                    stub.requests.append(Request(method, url.path, parse_qs(url.query),
                                                 self.headers.get("Authorization"), body))
                    status, payload, headers = stub.route(method, url.path, body, self.headers)
                self._send(status, payload, headers)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------------------ routes

    def _commit(self, repo: Repo, branch: str) -> str:
        repo.commits += 1
        oid = hashlib.sha1(f"{branch}-{repo.commits}".encode()).hexdigest()
        repo.heads[branch] = oid
        return oid

    def route(self, method: str, path: str, body: bytes, headers):
        not_found = (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
            repo = Repo(private=req.get("visibility") == "private")
            repo.branches["main"] = {".gitattributes": GITATTRIBUTES}
            self._commit(repo, "main")
            self.repos[repo_id] = repo
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if method == "GET" and "/resolve/" in path and not path.startswith("/api/"):  # a file's content
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            rev, _, name = rest.partition("/")
            repo = self.repos.get(unquote(repo_id))
            if repo is None:
                return not_found
            files = repo.branches.get(unquote(rev))
            if files is None:
                return 404, {"error": f"Invalid rev id: {unquote(rev)}"}, {"X-Error-Code": "RevisionNotFound"}
            if unquote(name) not in files:
                return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
            data = files[unquote(name)]
            return 200, data, {"X-Repo-Commit": repo.heads[unquote(rev)], "ETag": f'"{git_sha1(data)}"'}
        if not path.startswith("/api/models/"):
            return 404, {"error": f"no route {method} {path}"}, {}
        parts = path[len("/api/models/"):].split("/")
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        repo = self.repos.get(repo_id)
        if repo is None:
            return not_found
        action = rest[0] if rest else ""
        rev = unquote(rest[1]) if len(rest) > 1 else "main"
        no_rev = (404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        if method == "GET" and action == "revision" or (method == "GET" and not action):
            if rev not in repo.branches:
                return no_rev
            files = repo.branches[rev]
            return 200, {"id": repo_id, "sha": repo.heads[rev], "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(files)]}, {}
        if method == "GET" and action == "tree":
            if rev not in repo.branches:
                return no_rev
            files = repo.branches[rev]
            return 200, [{"type": "file", "path": p, "size": len(b), "oid": git_sha1(b)}
                         for p, b in sorted(files.items())], {}
        if method == "POST" and action == "preupload":
            req = json.loads(body)
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in req["files"]]}, {}
        if method == "POST" and action == "commit":
            if rev not in repo.branches:
                return no_rev
            files = dict(repo.branches[rev])
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] != "header":
                    return 400, {"error": f"unsupported commit item {item['key']}"}, {}
            repo.branches[rev] = files
            oid = self._commit(repo, rev)
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}, {}
        if method == "POST" and action == "branch":
            if rev in repo.branches:
                return 409, {"error": "Reference already exists"}, {}
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            repo.branches[rev] = dict(repo.branches[start])
            repo.heads[rev] = repo.heads[start]
            return 200, {}, {}
        return 404, {"error": f"no route {method} {path}"}, {}

    # ------------------------------------------------------------------------------------------------------ queries

    def writes(self) -> list[Request]:
        """Requests that change something (repo creation that succeeded, preuploads, commits, branches)."""
        return [r for r in self.requests if r.method == "POST" and any(
            k in r.path for k in ("/preupload/", "/commit/", "/branch/"))]
