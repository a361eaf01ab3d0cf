"""A loopback Hugging Face Hub for the tests: a real HTTP server on 127.0.0.1 (stdlib, plus PyYAML for card metadata).

`LoopbackHub` runs a `ThreadingHTTPServer` in a background thread and answers the part of the Hub HTTP API that the
real `huggingface_hub` client (written against 2.4) and `transformers` use for *model* repos:

* repos: create (409 + url when it exists, so `exist_ok=True` works), delete, info (`/api/models/{id}` and
  `/revision/{rev}`), tree listing (recursive or not, paginated with a `Link: <...>; rel="next"` header), paths-info,
  commits listing, refs, branches and tags;
* uploads: `preupload` (decides "regular" vs "lfs" like the Hub: `.gitattributes` `filter=lfs` rules, binary
  samples, files of 10 MB and more), the git-lfs batch API with the *basic* transfer (signed PUT hrefs back to this
  server, a verify action; objects already stored get no actions) and the NDJSON `commit` endpoint
  (header / file / lfsFile / deletedFile / deletedFolder);
* downloads: GET and HEAD `/{id}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag` (git blob id),
  `X-Linked-Etag` / `X-Linked-Size` for LFS files, `Content-Length` and `Range`;
* `whoami-v2`, `validate-yaml` (checks card metadata against a subset of the Hub's rules: 400 with the reasons);
  a fixed write token, 401 on writes without it (or with a wrong one), private repos
  invisible without it;
* errors shaped like the Hub's so that `hf_raise_for_status` maps them to the same exceptions: `X-Error-Code`
  (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), `X-Error-Message` and a `{"error": ...}` JSON body.

Other repo types (datasets, spaces) are answered with a clean 404 `RepoNotFound`.

Storage is in memory and content-addressed, like git: regular files under their git blob id (sha1 of
`blob <size>\\0<content>`), LFS files under their sha256, commits under a sha1 over their tree, parent and message;
branches and tags are names pointing at commit ids. A revision is a branch, a tag or a full commit id.

The client reads `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`, ... once, at import time, so client-side code must run
in a fresh process started with `LoopbackHub.env(home)`.
"""

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit


DEFAULT_TOKEN = "hf_loopback_write_token"
DEFAULT_USER = "tester"
DEFAULT_ORGS = ("org",)
# The Hub sends any file of 10 MB or more to LFS, whatever its name.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# The Hub caps tree pages at 1000 entries; tests may lower `LoopbackHub.tree_page_size` to exercise pagination.
TREE_PAGE_SIZE = 1000
COMMIT_ID = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")

# What the Hub writes in the initial commit of a new model repo (abridged): the LFS rules preupload follows.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in [
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    ]
)

# Variables a client subprocess must not inherit: they would move its cache or token away from the private HF_HOME
# given to `env()`, or switch it offline / to another endpoint behind our back.
_CLIENT_ENV_DROP = (
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
    "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "HF_MODULES_CACHE", "TRANSFORMERS_CACHE", "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING", "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
)


def git_blob_id(data: bytes) -> str:
    """Git's object id of a blob: the Hub's `oid` / `blobId` of a file, and the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _matches(path: str, patterns: list[str]) -> bool:
    """gitattributes / gitignore style matching, enough for the Hub's rules: a pattern without a slash matches any
    path segment (`*.safetensors`), one with a slash matches the path or one of its parent folders from the root."""
    parts = path.split("/")
    for pattern in patterns:
        anchored = "/" in pattern.rstrip("/")
        pattern = pattern.strip("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)] if anchored else parts
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            return True
    return False


@dataclass(frozen=True)
class Entry:
    """One file of a commit's tree."""

    oid: str  # git blob id: of the content for regular files, of the LFS pointer for LFS files
    size: int  # size of the real content
    lfs_sha256: str | None = None  # LFS files only: key of the content in the repo's LFS store


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit id
    tags: dict[str, str] = field(default_factory=dict)  # name -> commit id
    commits: dict[str, Commit] = field(default_factory=dict)
    objects: dict[str, bytes] = field(default_factory=dict)  # git blob id -> content of regular files
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content of LFS files

    def read(self, entry: Entry) -> bytes:
        return self.lfs[entry.lfs_sha256] if entry.lfs_sha256 else self.objects[entry.oid]


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": content_type})


# A subset of the values the Hub accepts for `license` and `pipeline_tag` in model card metadata.
HUB_LICENSES = {
    "apache-2.0", "mit", "openrail", "openrail++", "bigscience-openrail-m", "creativeml-openrail-m",
    "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause",
    "bsd-3-clause", "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0",
    "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-4.0", "ecl-2.0", "epl-2.0", "agpl-3.0", "gpl", "gpl-2.0", "gpl-3.0", "lgpl",
    "lgpl-2.1", "lgpl-3.0", "isc", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "mpl-2.0",
    "ms-pl", "odc-by", "odbl", "unlicense", "wtfpl", "zlib", "other", "unknown",
}
HUB_PIPELINE_TAGS = {
    "text-classification", "token-classification", "table-question-answering", "question-answering",
    "zero-shot-classification", "translation", "summarization", "feature-extraction", "text-generation",
    "fill-mask", "sentence-similarity", "text-to-speech", "text-to-audio", "automatic-speech-recognition",
    "audio-to-audio", "audio-classification", "voice-activity-detection", "depth-estimation", "image-classification",
    "object-detection", "image-segmentation", "text-to-image", "image-to-text", "image-to-image", "image-to-video",
    "unconditional-image-generation", "video-classification", "reinforcement-learning", "robotics",
    "tabular-classification", "tabular-regression", "zero-shot-image-classification", "zero-shot-object-detection",
    "text-to-video", "visual-question-answering", "document-question-answering", "image-feature-extraction",
    "mask-generation", "image-text-to-text", "video-text-to-text", "any-to-any", "keypoint-detection",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def card_metadata_errors(content: str) -> list[str]:
    """What the Hub's `validate-yaml` would object to in a model card's YAML front matter (a subset of its rules:
    a mapping, known `license` / `pipeline_tag`, string lists, repo ids for `base_model` / `datasets`, and a
    `model-index` that huggingface_hub can read back)."""
    import yaml  # PyYAML, a dependency of huggingface_hub
    from huggingface_hub.repocard_data import model_index_to_eval_results

    match = re.match(r"---\n(.*?)\n---(\n|$)", content, flags=re.DOTALL)
    if match is None:
        return []  # a card without metadata is accepted (with a warning on the Hub)
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"Invalid YAML in the card metadata: {error}"]
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["The card metadata must be a YAML mapping."]
    errors = []
    if "license" in metadata and metadata["license"] not in HUB_LICENSES:
        errors.append(f'"license" must be one of the Hub\'s license identifiers, got {metadata["license"]!r}.')
    if "pipeline_tag" in metadata and metadata["pipeline_tag"] not in HUB_PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be a Hub task, got {metadata["pipeline_tag"]!r}.')
    if "library_name" in metadata and not isinstance(metadata["library_name"], str):
        errors.append('"library_name" must be a string.')
    for key in ("tags", "language", "datasets", "base_model"):
        values = metadata.get(key)
        values = [values] if isinstance(values, str) else values
        if values is None:
            continue
        if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
            errors.append(f'"{key}" must be a string or a list of strings.')
        elif key in ("datasets", "base_model"):
            errors += [f'"{key}" entry {value!r} is not a repo id.' for value in values if not HUB_ID.fullmatch(value)]
    if "model-index" in metadata:
        try:
            name, results = model_index_to_eval_results(metadata["model-index"])
            if not name or not results:
                raise ValueError("needs a name and at least one result")
            for result in results:
                if result.metric_value is None or not result.dataset_type or not result.task_type:
                    raise ValueError("every result needs a task type, a dataset type and a metric value")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            errors.append(f'"model-index" is malformed ({type(error).__name__}: {error}).')
    return errors


class HubError(Exception):
    """An error answered like the Hub answers it: the status, `X-Error-Code` (which `hf_raise_for_status` turns into
    RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, ...), `X-Error-Message` and a JSON
    `{"error": message}` body."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}

    def response(self) -> Response:
        response = json_response({"error": self.message, **self.extra}, self.status)
        # Header values must be single-line latin-1; paths in messages may be neither.
        response.headers["X-Error-Message"] = " ".join(self.message.encode("ascii", "backslashreplace").decode().split())
        if self.code:
            response.headers["X-Error-Code"] = self.code
        response.headers.update(self.headers)
        return response


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


# ---------------------------------------------------------------------------------------------------------------------
# Routes. Paths are matched raw (still percent-encoded): the client quotes revisions with `safe=""` ("refs/pr/1" ->
# "refs%2Fpr%2F1") and tree paths the same way, so each captured group is unquoted on its own.
_NS = r"(?P<namespace>[^/]+)/(?P<name>[^/]+)"
_API = r"/api/(?P<repo_type>models|datasets|spaces)/" + _NS
_GIT = r"/(?:(?P<repo_type>datasets|spaces)/)?" + _NS + r"\.git/info/lfs/objects"
ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", _API, "repo_info"),
    ("GET", _API + r"/revision/(?P<rev>[^/]+)", "repo_info"),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", _API + r"/commits/(?P<rev>[^/]+)", "commits"),
    ("GET", _API + r"/refs", "refs"),
    ("POST", _API + r"/branch/(?P<branch>[^/]+)", "create_branch"),
    ("DELETE", _API + r"/branch/(?P<branch>[^/]+)", "delete_branch"),
    ("POST", _API + r"/tag/(?P<rev>[^/]+)", "create_tag"),
    ("DELETE", _API + r"/tag/(?P<tag>[^/]+)", "delete_tag"),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", _GIT + r"/batch", "lfs_batch"),
    ("POST", _GIT + r"/verify", "lfs_verify"),
    ("PUT", r"/lfs-upload/" + _NS + r"/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("GET", r"/(?:(?P<repo_type>datasets|spaces)/)?" + _NS + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
ROUTES = [(method, re.compile(pattern), handler) for method, pattern, handler in ROUTES]


def _route(method: str, path: str) -> tuple[str | None, dict[str, str]]:
    """The handler name for a request and its URL parameters, unquoted."""
    for candidate, pattern, handler in ROUTES:
        if candidate == method and (match := pattern.fullmatch(path)):
            return handler, {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
    return None, {}


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps the client's pooled connections alive; every response therefore carries a Content-Length and
    # every request body is read in full (Content-Length or chunked: the LFS PUT streams a file object).
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"

    # -- plumbing ------------------------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # the request log is `LoopbackHub.requests`, not stderr
        pass

    @property
    def hub(self) -> "LoopbackHub":
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.body = self._read_body()
        stall = self.hub.stall
        if stall is not None and stall.search(f"{method} {url.path}"):
            # A Hub that stops answering: the request was received, no answer comes until the test releases it.
            self.hub.requests.append((method, self.path, None))
            self.hub.release.wait(timeout=300)
            self.close_connection = True
            return
        name, groups = _route("GET" if method == "HEAD" else method, url.path)  # HEAD is GET without the body
        try:
            if name is None:
                raise HubError(404, f"Not found: {method} {url.path}")
            with self.hub.lock:  # handlers read and write the shared state; responses are sent outside the lock
                response = getattr(self, name)(**groups)
        except HubError as error:
            response = error.response()
        except Exception:  # a bug in this server: answer 500 and keep the traceback for the test that hit it
            self.hub.errors.append(traceback.format_exc())
            response = json_response({"error": "loopback hub internal error"}, 500)
        self.hub.requests.append((method, self.path, response.status))
        self._send(response, include_body=method != "HEAD")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # optional trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF closing each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, response: Response, include_body: bool) -> None:
        self.send_response(response.status)
        headers = {"Content-Type": "application/json", **response.headers,
                   "Content-Length": str(len(response.body)), "X-Request-Id": secrets.token_hex(8)}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if include_body:
            self.wfile.write(response.body)

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None

    # -- auth and lookups ----------------------------------------------------------------------------------------------
    def _user(self) -> dict | None:
        """The user behind the request's token, None when anonymous. Like the Hub, a token it does not know is a 401
        on every route (the exact message keeps `hf_raise_for_status` from calling it a missing repo)."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _require_user(self) -> dict:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated with a write token to do this")
        return user

    @staticmethod
    def _can_write(user: dict | None, namespace: str) -> bool:
        return user is not None and (namespace == user["name"] or namespace in user["orgs"])

    def _repo(self, namespace: str, name: str, repo_type: str | None = "models", write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(f"{namespace}/{name}") if repo_type in (None, "models") else None
        if repo is None or (repo.private and not self._can_write(user, namespace)):
            # The Hub answers a missing repo and someone else's private repo the same way, 401 for anonymous
            # callers and 404 otherwise, both `RepoNotFound`: a private repo is indistinguishable from a missing one.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and not self._can_write(self._require_user(), namespace):
            raise HubError(403, f"You don't have the rights to write to {repo.repo_id}")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        """A branch, a tag (also as refs/heads/..., refs/tags/...) or a full commit id of this repo."""
        name = revision.removeprefix("refs/heads/")
        if name in repo.branches:
            return repo.commits[repo.branches[name]]
        name = revision.removeprefix("refs/tags/")
        if name in repo.tags:
            return repo.commits[repo.tags[name]]
        if COMMIT_ID.fullmatch(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise _revision_not_found(revision)

    def _branch(self, repo: Repo, revision: str) -> str:
        """The branch a write targets: tags and commit ids are valid revisions but cannot be committed to."""
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.branches:
            self._commit(repo, revision)  # 404 RevisionNotFound when it is no revision at all
            raise HubError(400, f"Invalid rev id: {revision} is not a branch")
        return branch

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, Entry], title: str, message: str,
                    author: str) -> Commit:
        date = _now()
        tree = hashlib.sha1("".join(f"{path}\0{entry.oid}\n" for path, entry in sorted(files.items())).encode())
        header = f"tree {tree.hexdigest()}\nparent {parent}\nauthor {author} {date} #{len(repo.commits)}\n\n"
        oid = hashlib.sha1((header + title + "\n\n" + message).encode()).hexdigest()
        commit = Commit(oid, parent, files, title, message, author, date)
        repo.commits[oid] = commit
        return commit

    def _store_regular(self, repo: Repo, content: bytes) -> Entry:
        oid = git_blob_id(content)
        repo.objects[oid] = content
        return Entry(oid, len(content))

    # -- repos ---------------------------------------------------------------------------------------------------------
    def create_repo(self) -> Response:
        user = self._require_user()
        payload = self._json_body()
        if payload.get("type", "model") != "model":
            raise HubError(400, "The loopback Hub only hosts model repos")
        name, namespace = payload.get("name") or "", payload.get("organization") or user["name"]
        if not re.fullmatch(r"[\w.-]+", name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.endpoint}/{repo_id}"
        if repo_id in self.hub.repos:
            # `create_repo(exist_ok=True)` swallows the 409 and then reads `url` from this body.
            raise HubError(409, "You already created this model repo", extra={"url": url})
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        repo = Repo(repo_id, private, _now())
        # Like the Hub, a new repo starts with one commit holding the default .gitattributes.
        files = {".gitattributes": self._store_regular(repo, DEFAULT_GITATTRIBUTES.encode())}
        repo.branches["main"] = self._new_commit(repo, None, files, "initial commit", "", user["name"]).oid
        self.hub.repos[repo_id] = repo
        return json_response({"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def delete_repo(self) -> Response:
        payload = self._json_body()
        namespace = payload.get("organization") or self._require_user()["name"]
        repo = self._repo(namespace, payload.get("name") or "", payload.get("type", "model") + "s", write=True)
        del self.hub.repos[repo.repo_id]
        return json_response({})

    def repo_info(self, repo_type: str, namespace: str, name: str, rev: str = "main") -> Response:
        repo = self._repo(namespace, name, repo_type)
        commit = self._commit(repo, rev)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(self._file_info(path, entry))
                sibling["blobId"] = sibling.pop("oid")
                if entry.lfs_sha256:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256,
                                      "pointerSize": len(lfs_pointer(entry.lfs_sha256, entry.size))}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": namespace, "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": siblings,
        }
        config = commit.files.get("config.json")
        if config and not config.lfs_sha256:
            try:  # the Hub exposes a few config keys; pipelines and auto classes may look at them
                data = json.loads(repo.read(config))
                info["config"] = {key: data[key] for key in ("architectures", "model_type", "auto_map") if key in data}
                info["tags"] = ["transformers", *([data["model_type"]] if "model_type" in data else [])]
            except (ValueError, TypeError):
                pass
        return json_response(info)

    # -- listings ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _file_info(path: str, entry: Entry) -> dict:
        info = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
        if entry.lfs_sha256:
            info["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size,
                           "pointerSize": len(lfs_pointer(entry.lfs_sha256, entry.size))}
        return info

    @staticmethod
    def _folders(commit: Commit) -> dict[str, str]:
        """Every folder of the commit's tree with an id derived from its content (like a git tree id)."""
        members: dict[str, list[str]] = {}
        for path, entry in commit.files.items():
            parts = path.split("/")
            for depth in range(1, len(parts)):
                members.setdefault("/".join(parts[:depth]), []).append(f"{path}\0{entry.oid}")
        return {folder: hashlib.sha1("\n".join(sorted(items)).encode()).hexdigest()
                for folder, items in members.items()}

    def _paginate(self, items: list, path: str) -> Response:
        """One page of `items`; the next page's URL goes in a GitHub-style `Link` header, which is what the client's
        `paginate` follows."""
        size = self.hub.tree_page_size
        start = int(self.query.get("cursor") or 0)
        response = json_response(items[start:start + size])
        if start + size < len(items):
            query = {key: value for key, value in self.query.items() if key != "cursor"}
            query["cursor"] = str(start + size)
            response.headers["Link"] = f'<{self.hub.endpoint}{path}?{urlencode(query)}>; rel="next"'
        return response

    def tree(self, repo_type: str, namespace: str, name: str, rev: str, path: str = "") -> Response:
        repo = self._repo(namespace, name, repo_type)
        commit = self._commit(repo, rev)
        folders = self._folders(commit)
        prefix = path.strip("/")
        if prefix and prefix not in folders:
            raise HubError(404, f"{prefix} does not exist on {rev}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        base = prefix + "/" if prefix else ""

        def listed(item_path: str) -> bool:
            return item_path.startswith(base) and (recursive or "/" not in item_path[len(base):])

        items = [{"type": "directory", "oid": oid, "size": 0, "path": folder}
                 for folder, oid in folders.items() if listed(folder)]
        items += [self._file_info(file, entry) for file, entry in commit.files.items() if listed(file)]
        items.sort(key=lambda item: item["path"])
        return self._paginate(items, urlsplit(self.path).path)

    def paths_info(self, repo_type: str, namespace: str, name: str, rev: str) -> Response:
        repo = self._repo(namespace, name, repo_type)
        commit = self._commit(repo, rev)
        folders = self._folders(commit)
        paths = parse_qs(self.body.decode()).get("paths", []) if self.body else []
        infos = []
        for path in paths:
            if path in commit.files:
                infos.append(self._file_info(path, commit.files[path]))
            elif path in folders:
                infos.append({"type": "directory", "oid": folders[path], "size": 0, "path": path})
        return json_response(infos)

    def commits(self, repo_type: str, namespace: str, name: str, rev: str) -> Response:
        repo = self._repo(namespace, name, repo_type)
        commit, history = self._commit(repo, rev), []
        while commit is not None:
            history.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                            "authors": [{"user": commit.author}], "date": commit.date})
            commit = repo.commits.get(commit.parent)
        return self._paginate(history, urlsplit(self.path).path)

    def refs(self, repo_type: str, namespace: str, name: str) -> Response:
        repo = self._repo(namespace, name, repo_type)
        refs = {
            "branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                         for name, oid in sorted(repo.branches.items())],
            "tags": [{"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid}
                     for name, oid in sorted(repo.tags.items())],
            "converts": [],
        }
        if self.query.get("include_prs"):
            refs["pullRequests"] = []
        return json_response(refs)

    # -- branches and tags ---------------------------------------------------------------------------------------------
    @staticmethod
    def _check_ref_name(repo: Repo, name: str) -> None:
        if not name or COMMIT_ID.fullmatch(name) or name.startswith(("refs/", "/")) or ".." in name:
            raise HubError(400, f"Invalid reference name: {name!r}")
        if name in repo.branches or name in repo.tags:
            # A branch and a tag of the same name would make the revision ambiguous.
            raise HubError(409, f"Reference already exists: {name}")

    def create_branch(self, repo_type: str, namespace: str, name: str, branch: str) -> Response:
        repo = self._repo(namespace, name, repo_type, write=True)
        self._check_ref_name(repo, branch)
        starting_point = self._json_body().get("startingPoint") or "main"
        repo.branches[branch] = self._commit(repo, starting_point).oid
        return json_response({})

    def delete_branch(self, repo_type: str, namespace: str, name: str, branch: str) -> Response:
        repo = self._repo(namespace, name, repo_type, write=True)
        if branch not in repo.branches:
            raise _revision_not_found(branch)
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo.branches[branch]
        return json_response({})

    def create_tag(self, repo_type: str, namespace: str, name: str, rev: str) -> Response:
        repo = self._repo(namespace, name, repo_type, write=True)
        tag = self._json_body().get("tag") or ""
        self._check_ref_name(repo, tag)
        repo.tags[tag] = self._commit(repo, rev).oid
        return json_response({})

    def delete_tag(self, repo_type: str, namespace: str, name: str, tag: str) -> Response:
        repo = self._repo(namespace, name, repo_type, write=True)
        if tag not in repo.tags:
            raise _revision_not_found(tag)
        del repo.tags[tag]
        return json_response({})

    # -- uploads -------------------------------------------------------------------------------------------------------
    def preupload(self, repo_type: str, namespace: str, name: str, rev: str) -> Response:
        """Tell the client, per file, whether to send it inline in the commit ("regular") or through LFS, whether the
        repo's .gitignore drops it, and the oid of the file already at that path (the client skips unchanged files:
        git blob id for regular files, sha256 for LFS ones)."""
        repo = self._repo(namespace, name, repo_type, write=True)
        commit = repo.commits[repo.branches[self._branch(repo, rev)]]
        payload = self._json_body()

        def rules(filename: str) -> list[str]:
            entry = commit.files.get(filename)
            return repo.read(entry).decode(errors="replace").splitlines() if entry else []

        lfs_patterns = [line.split()[0] for line in rules(".gitattributes")
                        if not line.startswith("#") and "filter=lfs" in line.split()[1:]]
        ignore_lines = payload["gitIgnore"].splitlines() if "gitIgnore" in payload else rules(".gitignore")
        ignore_patterns = [line.strip() for line in ignore_lines if line.strip() and line[0] not in "#!"]
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size >= LFS_SIZE_THRESHOLD or b"\0" in sample or _matches(path, lfs_patterns)
            current = commit.files.get(path)
            files.append({
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": _matches(path, ignore_patterns),
                "oid": (current.lfs_sha256 or current.oid) if current else None,
            })
        return json_response({"files": files, "commitOid": commit.oid})

    def lfs_batch(self, namespace: str, name: str, repo_type: str | None = None) -> Response:
        """git-lfs batch API, basic transfer: objects we lack get an upload href (signed, since the client PUTs there
        without its token, as it would to S3) and a verify href; objects we have get no actions."""
        repo = self._repo(namespace, name, repo_type, write=True)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(422, "The loopback Hub only implements the LFS upload operation")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(422, "The loopback Hub only implements the basic LFS transfer")
        objects = []
        for item in payload.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            if not (isinstance(oid, str) and SHA256.fullmatch(oid) and isinstance(size, int) and size >= 0):
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid object: oid must be a sha256"}})
            elif oid in repo.lfs:
                objects.append({"oid": oid, "size": size})
            else:
                query = urlencode({"size": size, "signature": self.hub.sign(repo.repo_id, oid, size)})
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{repo.repo_id}/{oid}?{query}"},
                    "verify": {"href": f"{self.hub.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify"},
                }})
        return json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                             content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, namespace: str, name: str, oid: str) -> Response:
        """The basic-transfer PUT: authorised by the href's signature, not by a token; the content must hash to the
        announced oid."""
        repo = self.hub.repos.get(f"{namespace}/{name}")
        size = self.query.get("size", "")
        if repo is None or not hmac.compare_digest(self.query.get("signature", ""),
                                                   self.hub.sign(f"{namespace}/{name}", oid, size)):
            raise HubError(403, "SignatureDoesNotMatch")
        if len(self.body) != int(size) or hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        repo.lfs[oid] = self.body
        return Response(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def lfs_verify(self, namespace: str, name: str, repo_type: str | None = None) -> Response:
        repo = self._repo(namespace, name, repo_type, write=True)
        payload = self._json_body()
        data = repo.lfs.get(payload.get("oid"))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        return json_response({"success": True})

    def commit(self, repo_type: str, namespace: str, name: str, rev: str) -> Response:
        """NDJSON commit: a header line, then one operation per line. Operations apply to a copy of the branch head
        and the branch only moves once all of them succeeded, so a failed commit changes nothing."""
        repo = self._repo(namespace, name, repo_type, write=True)
        if self.query.get("create_pr"):
            raise HubError(400, "The loopback Hub does not implement pull requests")
        branch = self._branch(repo, rev)
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid NDJSON body: {error}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header, head = lines[0]["value"], repo.branches[branch]
        if header.get("parentCommit") not in (None, head):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "").rstrip("/") if key == "deletedFolder" else value.get("path", "")
            if not path or path.startswith("/") or any(part in ("", ".", "..", ".git") for part in path.split("/")):
                raise HubError(400, f"Invalid path in repo: {path!r}")
            if key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                files[path] = self._store_regular(repo, data)
            elif key == "lfsFile":
                oid = value.get("oid")
                data = repo.lfs.get(oid)
                if data is None or value.get("size", len(data)) != len(data):
                    raise HubError(400, f"LFS object {oid} for {path} was not uploaded (or has another size)")
                files[path] = Entry(git_blob_id(lfs_pointer(oid, len(data))), len(data), oid)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                inside = [file for file in files if file.startswith(path + "/")]
                if not inside:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for file in inside:
                    del files[file]
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        commit = self._new_commit(repo, head, files, header.get("summary") or "Update", header.get("description", ""),
                                  self._require_user()["name"])
        repo.branches[branch] = commit.oid
        return json_response({"success": True, "commitOid": commit.oid, "pullRequestUrl": None, "hookOutput": "",
                              "commitUrl": f"{self.hub.endpoint}/{repo.repo_id}/commit/{commit.oid}"})

    # -- downloads -----------------------------------------------------------------------------------------------------
    def resolve(self, namespace: str, name: str, rev: str, path: str, repo_type: str | None = None) -> Response:
        """A file at a revision. What `hf_hub_download` relies on: `X-Repo-Commit` (always, errors included, so a
        missing file is cached as missing for that commit), the ETag it names the cached blob after (`X-Linked-Etag`,
        the sha256, for LFS files; the git blob id otherwise), the size (`X-Linked-Size` / `Content-Length`) and
        `Range` for resumed downloads. The Hub redirects LFS files to a CDN; serving them directly with the same
        headers is equivalent for the client."""
        repo = self._repo(namespace, name, repo_type)
        commit = self._commit(repo, rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} does not exist at {rev}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        data = repo.read(entry)
        filename = quote(path.rsplit("/", 1)[-1])
        headers = {
            "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "X-Repo-Commit": commit.oid,
            "ETag": f'"{entry.oid}"',
            "Content-Disposition": f"inline; filename*=UTF-8''{filename}; filename=\"{filename}\";",
        }
        if entry.lfs_sha256:
            headers.update({"X-Linked-Etag": f'"{entry.lfs_sha256}"', "X-Linked-Size": str(entry.size)})
        status, byte_range = 200, self.headers.get("Range")
        if byte_range:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range.strip())
            if match is None or not any(match.groups()):
                raise HubError(416, f"Invalid range: {byte_range}", headers={"Content-Range": f"bytes */{len(data)}"})
            first, last = match.groups()
            if first:
                start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
            else:  # suffix range: the last N bytes
                start, stop = max(len(data) - int(last), 0), len(data)
            if start >= len(data) or start >= stop:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            status, data = 206, data[start:stop]
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{entry.size}"
        return Response(status, data, headers)

    # -- misc ----------------------------------------------------------------------------------------------------------
    def whoami(self) -> Response:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return json_response({
            "type": "user", "id": hashlib.sha1(user["name"].encode()).hexdigest()[:24], "name": user["name"],
            "fullname": user["name"], "email": None, "emailVerified": True, "isPro": False,
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in user["orgs"]],
            "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
        })

    def validate_yaml(self) -> Response:
        # `RepoCard.validate()` posts the whole card; a 400 with the reason as text becomes its ValueError.
        body = self._json_body()
        errors = card_metadata_errors(str(body.get("content", ""))) if body.get("repoType", "model") == "model" else []
        if errors:
            return Response(400, "\n".join(errors).encode(), {"Content-Type": "text/plain; charset=utf-8"})
        return json_response({"errors": [], "warnings": []})


class LoopbackHub:
    """The server and its in-memory state. Use as a context manager (or `start()` / `stop()`).

    `endpoint` and `token` are what a client needs (see `env()`); `requests` logs `(method, path, status)` of every
    request and `errors` keeps the traceback of any request the server itself failed on (a 500)."""

    def __init__(self, token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER, orgs: tuple[str, ...] = DEFAULT_ORGS):
        self.token = token
        self.tokens = {token: {"name": user, "orgs": list(orgs)}}
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.tree_page_size = TREE_PAGE_SIZE
        self.requests: list[tuple[str, str, int | None]] = []
        self.errors: list[str] = []
        # Requests whose "METHOD /path" this matches get no answer (status None in `requests`) until `release` is set.
        self.stall: re.Pattern | None = None
        self.release = threading.Event()
        self.endpoint = ""
        self._secret = secrets.token_bytes(32)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "LoopbackHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: the OS picks a free port
        self._server.hub = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()  # stalled requests end
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def sign(self, repo_id: str, oid: str, size) -> str:
        return hmac.new(self._secret, f"{repo_id}\n{oid}\n{size}".encode(), hashlib.sha256).hexdigest()

    def env(self, home: Path, **overrides: str | None) -> dict[str, str]:
        """`os.environ` for a client subprocess talking to this Hub, with its own HF_HOME (cache, token, remote-code
        modules) under `home`. These variables are read when huggingface_hub / transformers are imported, hence a
        fresh process. `overrides` set more variables (None removes one), e.g. `HF_HUB_OFFLINE="1"`."""
        env = {key: value for key, value in os.environ.items() if key not in _CLIENT_ENV_DROP}
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost"]))
        env.update({
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": self.token,
            "HF_HOME": str(home),
            "HF_HUB_OFFLINE": "0",  # the test process runs with HF_HUB_OFFLINE=1 (conftest)
            "HF_HUB_DISABLE_XET": "1",  # no Xet storage here: plain HTTP downloads and LFS uploads
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": no_proxy,  # a proxy from the environment must not intercept loopback traffic
            "no_proxy": no_proxy,
        })
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    # Direct, read-only views of the state for tests (no HTTP, no auth).
    def head(self, repo_id: str, revision: str = "main") -> str:
        """The commit id a revision of a repo points at."""
        with self.lock:
            return _Handler._commit(self.repos[repo_id], revision).oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """`{path: content}` of a revision of a repo."""
        with self.lock:
            repo = self.repos[repo_id]
            return {path: repo.read(entry) for path, entry in _Handler._commit(repo, revision).files.items()}

    def entry(self, repo_id: str, path: str, revision: str = "main") -> Entry:
        with self.lock:
            return _Handler._commit(self.repos[repo_id], revision).files[path]
