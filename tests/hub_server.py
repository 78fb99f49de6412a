"""A small Hub-protocol test server on 127.0.0.1, driven by the unmodified ``huggingface_hub`` client.

It speaks the HTTP endpoints that ``HfApi.create_repo`` / ``upload_folder`` / ``create_commit``,
``snapshot_download``, ``hf_hub_download``, ``ModelCard.load`` and transformers' ``from_pretrained``
use (see ``../shared/design/hf-integration.md``): repo creation, repo info by revision, README
metadata validation, preupload (every file "regular"), NDJSON commits stored per commit sha, the
tree listing, file resolution (``HEAD``/``GET``) and ``whoami``. No installable self-hosted Hub can
take a push offline, so the suite needs this test double of the remote service.

It is kept honest where the code under test relies on the Hub's behaviour: writes need a valid
token for the repo's namespace (401 with the Hub's error message otherwise, 403 for another
namespace), private repos are invisible without a token (401 ``RepoNotFound``), a second
``create`` is a 409, a commit against a stale ``parentCommit`` is a 412, LFS pointers are refused
(the server never asks for LFS), and README metadata is validated like the Hub does for what the
library writes: YAML that parses to a mapping, ``base_model`` ids that exist on this server, a known
``base_model_relation`` and a well-formed ``model-index``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["FakeHub", "Repo", "git_blob_oid"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    """The git blob sha1 of ``content``: the oid the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """One model repo: its commits (sha -> files) and the head of ``main``."""

    repo_id: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    head: str = ""

    def commit(self, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(
            json.dumps([self.head, message, sorted((p, git_blob_oid(c)) for p, c in files.items())]).encode()
        ).hexdigest()
        self.commits[sha], self.messages[sha], self.head = dict(files), message, sha
        return sha

    def files(self, revision: str) -> dict[str, bytes] | None:
        sha = self.head if revision == "main" else revision
        return self.commits.get(sha)


class _Reply(Exception):
    """An HTTP error answer: status, JSON body and the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """A threaded Hub-protocol server with in-memory repos.

    Attributes:
        url: ``http://127.0.0.1:PORT`` (set ``HF_ENDPOINT`` to it).
        token: The valid write token of user :attr:`user`.
        repos: ``repo_id -> Repo``.
        requests: ``(method, path)`` of every request served, in order.

    Example:
        >>> with FakeHub() as hub:  # doctest: +SKIP
        ...     HfApi(endpoint=hub.url, token=hub.token).create_repo("tester/x")
    """

    user = "tester"
    token = "hf_fake_write_token"

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    # -- the rules ----------------------------------------------------------------------------
    def authenticate(self, headers: Any) -> str | None:
        """The user a request is authenticated as; ``None`` without a token; 401 for a wrong one."""
        value = headers.get("Authorization")
        if not value:
            return None
        if value != f"Bearer {self.token}":
            raise _Reply(401, "Invalid credentials in Authorization header")
        return self.user

    def readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise _Reply(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise _Reply(401, "You must be authenticated to write")
        repo = self.readable(repo_id, user)
        if repo_id.split("/")[0] != user:
            raise _Reply(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def validate_metadata(self, content: str) -> list[str]:
        """Errors the Hub would report for a README's YAML metadata."""
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match is None:
            return []
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return [f"YAML does not parse: {err}"]
        if not isinstance(meta, dict):
            return ["metadata must be a YAML mapping"]
        errors = []
        bases = meta.get("base_model") or []
        for base in [bases] if isinstance(bases, str) else bases:
            if base not in self.repos:
                errors.append(f'"base_model" with value "{base}" is not valid. Use a model id from {self.url}/models')
        relation = meta.get("base_model_relation")
        if relation is not None and (relation not in _RELATIONS or not bases):
            errors.append(f'"base_model_relation" must be one of {_RELATIONS} and needs "base_model"')
        for entry in meta.get("model-index") or []:
            for result in entry.get("results", []) if isinstance(entry, dict) else [None]:
                ok = (
                    isinstance(result, dict)
                    and isinstance(result.get("task", {}).get("type"), str)
                    and isinstance(result.get("dataset", {}).get("type"), str)
                    and isinstance(result.get("dataset", {}).get("name"), str)
                    and result.get("metrics")
                    and all(isinstance(m.get("type"), str) and "value" in m for m in result["metrics"])
                )
                if not ok:
                    errors.append(f'"model-index" result is malformed: {result!r}')
        return errors


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    # -- plumbing -----------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode())

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
        try:
            user = self.hub.authenticate(self.headers)
            with self.hub.lock:
                self._route(path, query, user)
        except _Reply as reply:
            headers = {"X-Error-Message": reply.message}
            if reply.code:
                headers["X-Error-Code"] = reply.code
            self._send(reply.status, json.dumps({"error": reply.message}).encode(), headers)
        except Exception as err:  # a bug here must reach the client as an answer, not a dropped connection
            self._send(500, json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())

    do_GET = do_HEAD = do_POST = _dispatch

    # -- routes -------------------------------------------------------------------------------
    def _route(self, path: str, query: dict[str, list[str]], user: str | None) -> None:
        hub, method = self.hub, self.command
        if method == "GET" and path == "/api/whoami-v2":
            if user is None:
                raise _Reply(401, "Invalid credentials in Authorization header")
            return self._json(
                {
                    "type": "user",
                    "name": user,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                }
            )
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(self._body()), user)
        if method == "POST" and path == "/api/validate-yaml":
            errors = hub.validate_metadata(json.loads(self._body()).get("content", ""))
            return self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)
        api = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|preupload|commit|tree)/([^/]+)(/.*)?)?$", path)
        if api:
            repo_id, action, revision, sub = api.groups()
            if method == "GET" and action in (None, "revision"):
                return self._info(hub.readable(repo_id, user), revision or "main")
            if method == "GET" and action == "tree":
                return self._tree(
                    hub.readable(repo_id, user),
                    revision,
                    (sub or "").strip("/"),
                    query.get("recursive", ["false"])[0].lower() == "true",
                )
            if method == "POST" and action == "preupload":
                return self._preupload(hub.writable(repo_id, user), revision, json.loads(self._body()))
            if method == "POST" and action == "commit":
                return self._commit(hub.writable(repo_id, user), revision, self._body())
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if resolve and method in ("GET", "HEAD"):
            return self._resolve(hub.readable(resolve.group(1), user), resolve.group(2), resolve.group(3))
        raise _Reply(404, f"no route for {method} {path}")

    def _create(self, payload: dict[str, Any], user: str | None) -> None:
        if user is None:
            raise _Reply(401, "You must be authenticated to create a repo")
        namespace, name = payload.get("organization") or user, payload.get("name", "")
        if payload.get("type", "model") != "model" or not _NAME.match(name):
            raise _Reply(400, f"invalid repo name or type: {name!r}")
        if namespace != user:
            raise _Reply(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{name}"
        if repo_id in self.hub.repos:  # the Hub names the existing repo in the 409 body; exist_ok clients read it
            return self._json({"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"}, 409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.hub.repos[repo_id] = Repo(repo_id, private)
        repo.commit({".gitattributes": _GITATTRIBUTES}, "initial commit")
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _files(self, repo: Repo, revision: str) -> dict[str, bytes]:
        files = repo.files(revision)
        if files is None:
            raise _Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return files

    def _info(self, repo: Repo, revision: str) -> None:
        files = self._files(repo, revision)
        self._json(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "private": repo.private,
                "sha": repo.head if revision == "main" else revision,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            }
        )

    def _tree(self, repo: Repo, revision: str, prefix: str, recursive: bool) -> None:
        files = self._files(repo, revision)
        under = {p: c for p, c in files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            raise _Reply(404, f"{prefix} does not exist", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        start = len(prefix) + 1 if prefix else 0
        for path, content in sorted(under.items()):
            parts = path[start:].split("/")
            for depth in range(1, len(parts)):
                folder = path[:start] + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        folder,
                        {
                            "type": "directory",
                            "oid": hashlib.sha1(folder.encode()).hexdigest(),
                            "size": 0,
                            "path": folder,
                        },
                    )
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}
        self._json(list(entries.values()))

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> None:
        files = self._files(repo, revision)
        self._json(
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
                    }
                    for f in payload.get("files", [])
                ]
            }
        )

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        if revision != "main":
            raise _Reply(400, f"commits go to a branch; this server only has main, not {revision!r}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            raise _Reply(400, "a commit starts with a header holding a non-empty summary")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.head):
            raise _Reply(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[repo.head])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, "file content must be base64-encoded")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _Reply(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:  # lfsFile, copies: this server never asked for LFS uploads
                raise _Reply(400, f"unsupported commit operation {key!r} (no LFS upload was requested)")
        if "README.md" in files:
            errors = self.hub.validate_metadata(files["README.md"].decode())
            if errors:
                raise _Reply(400, "Invalid metadata in README.md: " + "; ".join(errors))
        sha = repo.commit(files, header["summary"])
        self._json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, repo: Repo, revision: str, filename: str) -> None:
        files = self._files(repo, revision)
        if filename not in files:
            raise _Reply(404, f"{filename} does not exist at {revision}", "EntryNotFound")
        content = files[filename]
        sha = repo.head if revision == "main" else revision
        self._send(
            200,
            content,
            {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(content)}"'},
            content_type="application/octet-stream",
        )
