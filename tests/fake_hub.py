"""A fake Hugging Face Hub on 127.0.0.1, speaking the HTTP endpoints huggingface_hub 2.x calls.

Implemented (model repos only, Xet disabled on the client with HF_HUB_DISABLE_XET=1):

- GET  /api/models/{repo}[/revision/{rev}]          repo_info (snapshot_download's first call)
- GET  /api/models/{repo}/tree/{rev}[/{path}]       list_repo_tree (the file listing)
- HEAD|GET /{repo}/resolve/{rev}/{path}             hf_hub_download (metadata, then content)
- POST /api/repos/create                            create_repo (409 when it exists)
- POST /api/models/{repo}/branch/{branch}           create_branch (409 when it exists)
- POST /api/validate-yaml                           README front matter check before a commit
- POST /api/models/{repo}/preupload/{rev}           upload modes: *.safetensors as LFS, the rest regular
- POST /{repo}.git/info/lfs/objects/batch           LFS batch: answers with an upload href on this server
- PUT  /lfs-upload/{oid}                            the LFS object upload itself (sha256 checked)
- POST /api/models/{repo}/commit/{rev}              the ndjson commit (header, file, lfsFile lines)

Every request is recorded in `FakeHub.requests`; `fail_on[endpoint] = status` makes one endpoint
answer with that status. Write endpoints need `Authorization: Bearer <one of tokens>` (401 otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import yaml


def git_blob_oid(content: bytes) -> str:
    """Return the git blob sha1 of `content`, as the Hub reports a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """One commit received on the commit endpoint."""

    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]
    authorization: str


@dataclass
class Repo:
    """A model repo: its branches (name -> {path: content}), head commit per branch, visibility."""

    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": uuid.uuid4().hex + "00000000"})


class FakeHub:
    """Serve fake Hub repos on 127.0.0.1 from a background thread; use as a context manager."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_fake_write_token",)):
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[Commit] = []
        self.created: list[dict] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.fail_on: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_model(self, repo_id: str, directory: Path, private: bool = False) -> None:
        """Serve every file of `directory` as the `main` branch of `repo_id`."""
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        repo.branches["main"] = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}

    def endpoints_called(self) -> list[str]:
        """Return the endpoint names requested so far, in order."""
        return [name for name, _ in self.requests]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # --- plumbing -------------------------------------------------------------------------
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None):
            data = body if body is not None else (json.dumps(payload).encode() if payload is not None else b"")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": message}, headers={"X-Error-Message": message})

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            return auth.startswith("Bearer ") and auth.removeprefix("Bearer ") in hub.tokens

        def _route(self, name: str, needs_auth: bool = False) -> bool:
            """Record the call; answer an injected failure or a 401; return True if handled."""
            hub.requests.append((name, self.path))
            if name in hub.fail_on:
                status = hub.fail_on[name]
                self._error(status, f"fake hub: {name} failed with {status}")
                return True
            if needs_auth and not self._authorized():
                self._error(401, "Invalid credentials in Authorization header")
                return True
            return False

        def _repo(self, repo_id: str, revision: str = "main") -> tuple[Repo, dict[str, bytes]] | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
                return None
            revision = unquote(revision)
            if revision in repo.heads.values():
                revision = next(b for b, h in repo.heads.items() if h == revision)
            if revision not in repo.branches:
                self._send(404, {"error": "Invalid rev id"}, headers={"X-Error-Code": "RevisionNotFound"})
                return None
            return repo, repo.branches[revision]

        # --- verbs ----------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            parts = urlparse(self.path).path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                if "tree" in parts:
                    at = parts.index("tree")
                    if self._route("tree"):
                        return
                    self._tree("/".join(parts[2:at]), parts[at + 1])
                    return
                if self._route("model_info"):
                    return
                at = parts.index("revision") if "revision" in parts else len(parts)
                repo_id = "/".join(parts[2:at])
                revision = parts[at + 1] if at < len(parts) else "main"
                found = self._repo(repo_id, revision)
                if found:
                    repo, files = found
                    branch = next((b for b in repo.branches if repo.branches[b] is files), "main")
                    siblings = [{"rfilename": name} for name in files]
                    self._send(
                        200, {"id": repo_id, "sha": repo.heads[branch], "private": repo.private, "siblings": siblings}
                    )
                return
            if "resolve" in parts:
                at = parts.index("resolve")
                if self._route("resolve"):
                    return
                found = self._repo("/".join(parts[:at]), parts[at + 1])
                if not found:
                    return
                repo, files = found
                path = unquote("/".join(parts[at + 2 :]))
                branch = next(b for b in repo.branches if repo.branches[b] is files)
                if path not in files:
                    self._send(
                        404,
                        {"error": "Entry not found"},
                        headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.heads[branch]},
                    )
                    return
                content = files[path]
                headers = {"X-Repo-Commit": repo.heads[branch], "ETag": f'"{git_blob_oid(content)}"'}
                self._send(200, headers=headers, body=content)
                return
            self._route("unknown")
            self._error(404, f"fake hub: no route for GET {self.path}")

        def _tree(self, repo_id: str, revision: str) -> None:
            found = self._repo(repo_id, revision)
            if found:
                _, files = found
                entries = [
                    {"type": "file", "path": name, "size": len(data), "oid": git_blob_oid(data)}
                    for name, data in sorted(files.items())
                ]
                self._send(200, entries)

        def do_PUT(self) -> None:
            parts = urlparse(self.path).path.strip("/").split("/")
            if parts[0] == "lfs-upload":
                body = self._body()
                if self._route("lfs_upload"):
                    return
                if hashlib.sha256(body).hexdigest() != parts[1]:
                    self._error(400, "sha256 mismatch")
                    return
                hub.lfs_objects[parts[1]] = body
                self._send(200, {})
                return
            self._route("unknown")
            self._error(404, f"fake hub: no route for PUT {self.path}")

        def do_POST(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            body = self._body()
            if parts == ["api", "repos", "create"]:
                if self._route("create_repo", needs_auth=True):
                    return
                payload = json.loads(body)
                repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                hub.created.append(payload)
                if repo_id in hub.repos:
                    message = "You already created this model repo"
                    self._send(409, {"error": message, "url": f"{hub.endpoint}/{repo_id}"})
                    return
                hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
                self._send(200, {"url": f"{hub.endpoint}/{repo_id}"})
                return
            if parts == ["api", "validate-yaml"]:
                if self._route("validate_yaml"):
                    return
                content = json.loads(body)["content"]
                try:
                    yaml.safe_load(content.split("---")[1])
                except (yaml.YAMLError, IndexError) as err:
                    self._send(400, {"errors": [{"message": str(err)}]})
                    return
                self._send(200, {"errors": [], "warnings": []})
                return
            if parts[-1] == "batch" and parts[-4:-1] == ["info", "lfs", "objects"]:
                if self._route("lfs_batch", needs_auth=True):
                    return
                objects = json.loads(body)["objects"]
                answer = [
                    {
                        "oid": obj["oid"],
                        "size": obj["size"],
                        "authenticated": True,
                        "actions": {"upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"}},
                    }
                    for obj in objects
                ]
                self._send(200, {"transfer": "basic", "objects": answer})
                return
            if parts[:2] == ["api", "models"] and len(parts) >= 5:
                action, revision = parts[-2], unquote(parts[-1])
                repo_id = "/".join(parts[2:-2])
                if action == "branch":
                    self._create_branch(repo_id, revision)
                    return
                if action == "preupload":
                    if self._route("preupload", needs_auth=True) or not self._repo(repo_id, revision):
                        return
                    files = json.loads(body)["files"]
                    modes = [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ]
                    self._send(200, {"files": modes})
                    return
                if action == "commit":
                    self._commit(repo_id, revision, body)
                    return
            self._route("unknown")
            self._error(404, f"fake hub: no route for POST {self.path}")

        def _create_branch(self, repo_id: str, branch: str) -> None:
            if self._route("create_branch", needs_auth=True):
                return
            found = self._repo(repo_id)
            if not found:
                return
            repo, main = found
            if branch in repo.branches:
                self._error(409, "Reference already exists")
                return
            repo.branches[branch] = dict(main)
            repo.heads[branch] = repo.heads["main"]
            self._send(200, {})

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            if self._route("commit", needs_auth=True):
                return
            found = self._repo(repo_id, revision)
            if not found:
                return
            repo, files = found
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            received: dict[str, bytes] = {}
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    received[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        self._error(400, f"LFS object {value['oid']} was never uploaded")
                        return
                    received[value["path"]] = hub.lfs_objects[value["oid"]]
            files.update(received)
            branch = next(b for b in repo.branches if repo.branches[b] is files)
            repo.heads[branch] = uuid.uuid4().hex + "00000000"
            hub.commits.append(
                Commit(
                    repo_id=repo_id,
                    revision=revision,
                    summary=header["summary"],
                    description=header.get("description", ""),
                    files=received,
                    authorization=self.headers.get("Authorization", ""),
                )
            )
            query = parse_qs(urlparse(self.path).query)
            self._send(
                200,
                {
                    "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{repo.heads[branch]}",
                    "commitOid": repo.heads[branch],
                    "pullRequestUrl": None if "create_pr" not in query else f"{hub.endpoint}/{repo_id}/discussions/1",
                },
            )

    return Handler
