"""Hub round trips against the loopback Hub of tests/hub_server.py: push_to_hub, from_pretrained by repo id, revision
pinning, snapshot_download + offline loading, remote code, pipelines, errors, and the raw file API.

Client-side code runs in fresh subprocesses started with `hub_server.env(...)`: huggingface_hub and transformers read
HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE when they are imported, and this test process was imported offline."""

import hashlib
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hub_server import git_blob_id

from tiny_models import BLOCK_PACKAGE, make_processor_and_model


TESTS_DIR = Path(__file__).resolve().parent
REPO = "org/tiny-sparsemoe-vlm"
REVISIONS_REPO = "org/tiny-sparsemoe-vlm-revisions"
PROMPT = "<image> what colour?"
# Without remote code, the Auto classes only know the model once the package is imported (it registers itself).
IMPORT_PACKAGE = "import hf_sparsemoe_vlm\n"
# Loads the published model + processor by repo id and checks them against the weights and logits saved before the
# push.
CHECK_LOGITS = """
    import PIL.Image
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    expected = torch.load({expected!r})

    def check(repo_id, version, **kwargs):
        processor = AutoProcessor.from_pretrained(repo_id, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(repo_id, **kwargs)
        state = model.state_dict()
        assert state.keys() == expected[version + "_state"].keys()
        assert all(torch.equal(state[name], tensor) for name, tensor in expected[version + "_state"].items())
        inputs = processor(images=PIL.Image.open({image!r}), text={prompt!r}, return_tensors="pt")
        assert all(torch.equal(inputs[key], expected["inputs"][key]) for key in ("input_ids", "pixel_values"))
        with torch.no_grad():
            logits = model(**inputs).logits
        # Bit-identical to the same checkpoint loaded from a local folder before the push. The in-memory model may
        # differ by an ulp (~1e-8): loaded tensors live at 16-byte offsets of the memory-mapped safetensors file
        # rather than at 64-byte aligned fresh allocations, which steers a few CPU kernels onto other code paths.
        # v1 and v2 differ by orders of magnitude more.
        assert torch.equal(logits, expected[version + "_reloaded"])
        torch.testing.assert_close(logits, expected[version], rtol=0, atol=1e-6)
        return processor, model
"""


def check_logits(published) -> str:
    return CHECK_LOGITS.format(expected=published["expected_path"], image=published["image"], prompt=PROMPT)


def cache_folder(home: Path, repo_id: str) -> Path:
    return home / "hub" / ("models--" + repo_id.replace("/", "--"))


def cached_refs(home: Path, repo_id: str) -> dict[str, str]:
    """The client's cache records the commit each branch / tag name resolved to under `refs/`."""
    refs = cache_folder(home, repo_id) / "refs"
    return {path.relative_to(refs).as_posix(): path.read_text() for path in refs.rglob("*") if path.is_file()}


def run_client(hub, home: Path, *script_parts: str, **env) -> subprocess.CompletedProcess:
    """Run the script (parts dedented one by one) in a fresh interpreter configured for the loopback Hub, with its
    own HF_HOME `home`; it must succeed."""
    script = "".join(textwrap.dedent(part) for part in script_parts)
    result = subprocess.run([sys.executable, "-c", script], cwd=home.parent,
                            env=hub.env(home, **env), capture_output=True, text=True, timeout=300)
    assert not hub.errors, hub.errors[-1]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def published(hub_server, tmp_path_factory):
    """Push a tiny model + processor to REPO and REVISIONS_REPO; on REVISIONS_REPO, branch `v1-branch` and tag `v1.0`
    point at that first push and `main` then gets v2 (other weights). Expected outputs are saved before pushing."""
    work = tmp_path_factory.mktemp("hub-published")
    script = f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import PIL.Image
        import torch
        from huggingface_hub import HfApi

        from hf_sparsemoe_vlm import SparseMoEVLMForConditionalGeneration
        from tiny_models import make_processor_and_model

        processor, model = make_processor_and_model(router_type="top_p", num_shared_experts=1)
        torch.manual_seed(1)
        model_v2 = SparseMoEVLMForConditionalGeneration(model.config).eval()
        image = PIL.Image.new("RGB", (40, 30), (255, 0, 0))
        image.save("red.png")
        inputs = processor(images=image, text={PROMPT!r}, return_tensors="pt")
        with torch.no_grad():
            expected = {{"inputs": dict(inputs), "v1": model(**inputs).logits, "v2": model_v2(**inputs).logits,
                        "v1_state": {{name: tensor.clone() for name, tensor in model.state_dict().items()}},
                        "v2_state": {{name: tensor.clone() for name, tensor in model_v2.state_dict().items()}}}}
        for version, pushed in (("v1", model), ("v2", model_v2)):
            pushed.save_pretrained("local-" + version)
            reloaded = SparseMoEVLMForConditionalGeneration.from_pretrained("local-" + version).eval()
            with torch.no_grad():
                expected[version + "_reloaded"] = reloaded(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        expected["text"] = processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
        torch.save(expected, "expected.pt")

        for repo_id in ({REPO!r}, {REVISIONS_REPO!r}):
            model.push_to_hub(repo_id)
            processor.push_to_hub(repo_id)
        api = HfApi()
        v1_sha = api.model_info({REVISIONS_REPO!r}).sha
        api.create_branch({REVISIONS_REPO!r}, branch="v1-branch", revision=v1_sha)
        api.create_tag({REVISIONS_REPO!r}, tag="v1.0", revision=v1_sha)
        model_v2.push_to_hub({REVISIONS_REPO!r})
        print("V1_SHA=" + v1_sha)
    """
    result = run_client(hub_server, work / "hf_home", script)
    v1_sha = result.stdout.split("V1_SHA=")[1].split()[0]
    expected = torch.load(work / "expected.pt")
    return {"expected_path": str(work / "expected.pt"), "image": str(work / "red.png"), "expected": expected,
            "v1_sha": v1_sha}


@pytest.mark.slow
def test_push_to_hub_then_from_pretrained_by_repo_id_gives_back_the_same_model(hub_server, published, tmp_path):
    files = hub_server.files(REPO)
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md",
            "modeling_sparsemoe_vlm.py"} <= set(files)
    weights = hub_server.entry(REPO, "model.safetensors")
    assert weights.lfs_sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()  # uploaded through LFS
    assert hub_server.entry(REPO, "config.json").lfs_sha256 is None  # inline in the commit
    script = f"""
        processor, model = check({REPO!r}, "v1")
        print("LOADED", type(model).__name__, type(processor).__name__)
    """
    result = run_client(hub_server, tmp_path / "hf_home", IMPORT_PACKAGE, check_logits(published), script)
    assert "LOADED SparseMoEVLMForConditionalGeneration SparseMoEVLMProcessor" in result.stdout
    assert cached_refs(tmp_path / "hf_home", REPO) == {"main": hub_server.head(REPO)}


@pytest.mark.slow
def test_revision_pinning_by_branch_tag_and_commit(hub_server, published, tmp_path):
    v1_sha = published["v1_sha"]
    assert hub_server.head(REVISIONS_REPO, "v1-branch") == hub_server.head(REVISIONS_REPO, "v1.0") == v1_sha
    assert hub_server.head(REVISIONS_REPO) != v1_sha
    v1_files, v2_files = hub_server.files(REVISIONS_REPO, v1_sha), hub_server.files(REVISIONS_REPO)
    # Pushing v2 re-uploaded the config, card and processor files too, but the client skipped the unchanged ones
    # (preupload returns the current oids): the v2 commit only changes the weights.
    assert v1_files.keys() == v2_files.keys()
    assert {path for path in v1_files if v1_files[path] != v2_files[path]} == {"model.safetensors"}
    assert not torch.equal(published["expected"]["v1"], published["expected"]["v2"])
    script = f"""
        for revision in ("v1-branch", "v1.0", {v1_sha!r}):
            check({REVISIONS_REPO!r}, "v1", revision=revision)
        check({REVISIONS_REPO!r}, "v2")
        check({REVISIONS_REPO!r}, "v2", revision="main")
        print("REVISIONS_OK")
    """
    result = run_client(hub_server, tmp_path / "hf_home", IMPORT_PACKAGE, check_logits(published), script)
    assert "REVISIONS_OK" in result.stdout
    # what each name resolved to (X-Repo-Commit), as the client recorded it in its cache
    v2_sha = hub_server.head(REVISIONS_REPO)
    assert cached_refs(tmp_path / "hf_home", REVISIONS_REPO) == {"v1-branch": v1_sha, "v1.0": v1_sha, "main": v2_sha}
    assert sorted(path.name for path in cache_folder(tmp_path / "hf_home", REVISIONS_REPO).joinpath("snapshots")
                  .iterdir()) == sorted([v1_sha, v2_sha])


@pytest.mark.slow
def test_snapshot_download_then_load_offline_with_the_hub_gone(hub_server, published, tmp_path):
    home = tmp_path / "hf_home"
    script = f"""
        import os
        from huggingface_hub import snapshot_download

        folder = snapshot_download({REPO!r})
        print("FILES=" + ",".join(sorted(
            os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
        )))
    """
    result = run_client(hub_server, home, script)
    assert result.stdout.split("FILES=")[1].split() == [",".join(sorted(hub_server.files(REPO)))]
    requests_before = len(hub_server.requests)
    # Offline, and the endpoint points at a closed port: everything must come from the cache.
    script = f"""
        from huggingface_hub import constants
        assert constants.HF_HUB_OFFLINE
        check({REPO!r}, "v1")
        print("OFFLINE_OK")
    """
    result = run_client(hub_server, home, IMPORT_PACKAGE, check_logits(published), script, HF_HUB_OFFLINE="1",
                        HF_ENDPOINT="http://127.0.0.1:9")
    assert "OFFLINE_OK" in result.stdout
    assert len(hub_server.requests) == requests_before


@pytest.mark.slow
def test_remote_code_checkpoint_loads_from_the_hub_where_the_package_is_not_importable(hub_server, published,
                                                                                        tmp_path):
    config = json.loads(hub_server.files(REPO)["config.json"])
    assert config["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_sparsemoe_vlm.SparseMoEVLMForConditionalGeneration"
    )
    script = f"""
        processor, model = check({REPO!r}, "v1", trust_remote_code=True)
        for obj in (model, processor, processor.image_processor):
            assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
        print("REMOTE_CODE_OK", type(model).__name__)
    """
    result = run_client(hub_server, tmp_path / "hf_home", BLOCK_PACKAGE, check_logits(published), script)
    assert "REMOTE_CODE_OK SparseMoEVLMForConditionalGeneration" in result.stdout


@pytest.mark.slow
def test_pipeline_from_a_hub_id_matches_processor_and_generate(hub_server, published, tmp_path):
    script = f"""
        from transformers import pipeline

        import hf_sparsemoe_vlm  # registers the model with the Auto classes

        pipe = pipeline("image-text-to-text", model={REPO!r})
        out = pipe(images={published["image"]!r}, text={PROMPT!r}, max_new_tokens=5, return_full_text=False)
        print("GENERATED=" + repr(out[0]["generated_text"]))
    """
    result = run_client(hub_server, tmp_path / "hf_home", script)
    assert f"GENERATED={published['expected']['text']!r}" in result.stdout


@pytest.mark.slow
def test_missing_repo_missing_revision_and_wrong_token_errors(hub_server, published, tmp_path):
    head, files = hub_server.head(REPO), hub_server.files(REPO)
    script = f"""
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
        from transformers import AutoConfig, AutoModelForImageTextToText

        import hf_sparsemoe_vlm  # registers the model with the Auto classes

        try:
            AutoConfig.from_pretrained("org/no-such-model")
        except OSError as error:
            assert "org/no-such-model" in str(error), str(error)
            assert isinstance(error.__cause__, RepositoryNotFoundError), repr(error.__cause__)
        else:
            raise AssertionError("loading a missing repo did not raise")

        try:
            AutoConfig.from_pretrained({REPO!r}, revision="no-such-branch")
        except OSError as error:
            assert "no-such-branch" in str(error), str(error)
            assert isinstance(error.__cause__, RevisionNotFoundError), repr(error.__cause__)
        else:
            raise AssertionError("loading a missing revision did not raise")

        model = AutoModelForImageTextToText.from_pretrained({REPO!r})
        try:
            model.push_to_hub({REPO!r}, token="hf_wrong_token")
        except HfHubHTTPError as error:
            assert error.response.status_code == 401, error.response.status_code
            print("PUSH_REJECTED", error.response.status_code)
        else:
            raise AssertionError("pushing with a wrong token did not raise")
    """
    result = run_client(hub_server, tmp_path / "hf_home", script)
    assert "PUSH_REJECTED 401" in result.stdout
    assert hub_server.head(REPO) == head and hub_server.files(REPO) == files


def test_upload_regular_and_lfs_files_then_download_identical_bytes(hub_server, tmp_path):
    text, binary = b"just some text\n" * 3, bytes(range(256)) * 40  # NUL bytes: binary, hence LFS whatever its name
    (tmp_path / "payload.dat").write_bytes(binary)
    script = f"""
        import os
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

        api = HfApi()
        api.create_repo("org/files")
        api.upload_file(path_or_fileobj={text!r}, path_in_repo="notes/readme.txt", repo_id="org/files")
        api.upload_file(path_or_fileobj={str(tmp_path / "payload.dat")!r}, path_in_repo="payload.dat",
                        repo_id="org/files")
        api.upload_file(path_or_fileobj={str(tmp_path / "payload.dat")!r}, path_in_repo="copy/payload.dat",
                        repo_id="org/files")  # same content: the LFS batch answer has no upload action
        for name in ("notes/readme.txt", "payload.dat", "copy/payload.dat"):
            path = hf_hub_download("org/files", name)
            meta = get_hf_file_metadata(hf_hub_url("org/files", name))
            print("FILE", name, open(path, "rb").read().hex(), meta.etag, meta.size,
                  os.path.basename(os.path.realpath(path)), meta.commit_hash)
        print("LIST", ",".join(api.list_repo_files("org/files")))
    """
    lines = run_client(hub_server, tmp_path / "hf_home", script).stdout.splitlines()
    downloads = {line.split()[1]: line.split()[2:] for line in lines if line.startswith("FILE ")}
    head = hub_server.head("org/files")
    sha256 = hashlib.sha256(binary).hexdigest()
    assert downloads["notes/readme.txt"] == [text.hex(), git_blob_id(text), str(len(text)), git_blob_id(text), head]
    for name in ("payload.dat", "copy/payload.dat"):
        # LFS files: the etag (and cache blob name) is the sha256 of the content, from X-Linked-Etag
        assert downloads[name] == [binary.hex(), sha256, str(len(binary)), sha256, head]
        assert hub_server.entry("org/files", name).lfs_sha256 == sha256
    assert hub_server.entry("org/files", "notes/readme.txt").lfs_sha256 is None
    assert [line for line in lines if line.startswith("LIST ")] == [
        "LIST .gitattributes,copy/payload.dat,notes/readme.txt,payload.dat"
    ]
    puts = [path for method, path, _ in hub_server.requests if method == "PUT" and "/org/files/" in path]
    assert len(puts) == 1 and sha256 in puts[0]


def test_refs_branches_tags_and_pinned_downloads(hub_server, tmp_path):
    script = """
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        api.create_repo("org/refs")
        first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="value.txt", repo_id="org/refs").oid
        api.create_branch("org/refs", branch="stable")
        api.create_tag("org/refs", tag="v1", revision=first)
        api.upload_file(path_or_fileobj=b"v2", path_in_repo="value.txt", repo_id="org/refs")
        api.create_branch("org/refs", branch="stable", exist_ok=True)
        try:
            api.create_tag("org/refs", tag="v1")
        except HfHubHTTPError as error:
            assert error.response.status_code == 409
        else:
            raise AssertionError("creating an existing tag did not raise")
        refs = api.list_repo_refs("org/refs")
        print("BRANCHES", sorted((ref.name, ref.ref, ref.target_commit) for ref in refs.branches))
        print("TAGS", [(ref.name, ref.ref, ref.target_commit) for ref in refs.tags])
        for revision in ("main", "stable", "v1", first):
            print("VALUE", revision, open(hf_hub_download("org/refs", "value.txt", revision=revision)).read())
        print("COMMITS", [commit.title for commit in api.list_repo_commits("org/refs")])
    """
    out = run_client(hub_server, tmp_path / "hf_home", script).stdout
    first, main = hub_server.head("org/refs", "v1"), hub_server.head("org/refs")
    assert f"BRANCHES {[('main', 'refs/heads/main', main), ('stable', 'refs/heads/stable', first)]}" in out
    assert f"TAGS {[('v1', 'refs/tags/v1', first)]}" in out
    for revision, value in (("main", "v2"), ("stable", "v1"), ("v1", "v1"), (first, "v1")):
        assert f"VALUE {revision} {value}\n" in out
    assert "COMMITS ['Upload value.txt with huggingface_hub', 'Upload value.txt with huggingface_hub', " \
           "'initial commit']" in out


def test_tree_pagination_private_repos_and_auth(hub_server, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_server, "tree_page_size", 2)  # 5 entries -> 3 pages followed through Link headers
    script = """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
        from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError

        api = HfApi()
        api.create_repo("org/private", private=True)
        api.create_commit("org/private", commit_message="files", operations=[
            CommitOperationAdd(path_or_fileobj=b"a", path_in_repo="a.txt"),
            CommitOperationAdd(path_or_fileobj=b"b", path_in_repo="sub/b.txt"),
            CommitOperationAdd(path_or_fileobj=b"c", path_in_repo="sub/c.txt"),
        ])
        print("TREE", [(entry.path, type(entry).__name__) for entry in api.list_repo_tree("org/private", recursive=True)])
        print("SUB", [entry.path for entry in api.list_repo_tree("org/private", path_in_repo="sub")])
        api.create_commit("org/private", commit_message="rm", operations=[CommitOperationDelete("sub/")])
        print("AFTER", api.list_repo_files("org/private"))
        try:
            api.create_commit("org/private", commit_message="rm", operations=[CommitOperationDelete("missing.txt")])
        except RemoteEntryNotFoundError as error:
            print("DELETE_MISSING", error.response.status_code)
        for token in (False, "hf_wrong_token"):
            try:
                HfApi(token=token).model_info("org/private")
            except RepositoryNotFoundError as error:
                print("ANONYMOUS", error.response.status_code, error.response.headers["X-Error-Code"])
            except HfHubHTTPError as error:
                print("WRONG_TOKEN", error.response.status_code, error.response.headers["X-Error-Message"])
        try:
            HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/private")
        except HfHubHTTPError as error:
            print("ANONYMOUS_WRITE", error.response.status_code)
        print("WHOAMI", api.whoami()["name"])
        api.delete_repo("org/private")
        try:
            api.model_info("org/private")
        except RepositoryNotFoundError as error:
            print("DELETED", error.response.status_code)
    """
    out = run_client(hub_server, tmp_path / "hf_home", script).stdout
    assert ("TREE [('.gitattributes', 'RepoFile'), ('a.txt', 'RepoFile'), ('sub', 'RepoFolder'), "
            "('sub/b.txt', 'RepoFile'), ('sub/c.txt', 'RepoFile')]") in out
    assert "SUB ['sub/b.txt', 'sub/c.txt']" in out
    assert "AFTER ['.gitattributes', 'a.txt']" in out
    assert "DELETE_MISSING 404" in out
    assert "ANONYMOUS 401 RepoNotFound" in out  # a private repo looks missing without the token
    assert "WRONG_TOKEN 401 Invalid credentials in Authorization header" in out
    assert "ANONYMOUS_WRITE 401" in out
    assert "WHOAMI tester" in out
    assert "DELETED 404" in out and "org/private" not in hub_server.repos
    # the recursive listing of 5 entries took 3 pages, list_repo_files of 2 entries one
    tree_pages = [path for _, path, _ in hub_server.requests if path.startswith("/api/models/org/private/tree/main?")]
    assert len(tree_pages) == 4 and sum("cursor=" in path for path in tree_pages) == 2


def _http(hub, method: str, path: str, headers: dict | None = None, data: bytes | None = None):
    """A raw request from this process (no Hub client): status, headers, body."""
    request = urllib.request.Request(hub.endpoint + path, data=data, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an environment proxy
    try:
        with opener.open(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_error_shapes_and_range_requests_over_raw_http(hub_server):
    auth = {"Authorization": f"Bearer {hub_server.token}"}
    status, headers, body = _http(hub_server, "POST", "/api/repos/create", auth, json.dumps({
        "name": "raw", "organization": "org", "type": "model"}).encode())
    assert status == 200 and json.loads(body)["url"] == f"{hub_server.endpoint}/org/raw"
    status, _, body = _http(hub_server, "POST", "/api/repos/create", auth, json.dumps({
        "name": "raw", "organization": "org"}).encode())
    assert status == 409 and json.loads(body)["url"] == f"{hub_server.endpoint}/org/raw"
    gitattributes = hub_server.files("org/raw")[".gitattributes"]
    head = hub_server.head("org/raw")

    for path, expected_status, code in [
        ("/org/nope/resolve/main/config.json", 401, "RepoNotFound"),  # anonymous: 401, like the Hub
        ("/api/models/org/nope", 401, "RepoNotFound"),
        ("/datasets/org/raw/resolve/main/.gitattributes", 401, "RepoNotFound"),  # no dataset repos here
        ("/org/raw/resolve/nope/.gitattributes", 404, "RevisionNotFound"),
        ("/api/models/org/raw/revision/nope", 404, "RevisionNotFound"),
        ("/org/raw/resolve/main/chat_template.jinja", 404, "EntryNotFound"),
        ("/api/models/org/raw/tree/main/nope", 404, "EntryNotFound"),
    ]:
        status, headers, body = _http(hub_server, "GET", path)
        assert (status, headers["X-Error-Code"]) == (expected_status, code), path
        assert json.loads(body)["error"] == headers["X-Error-Message"]
    assert _http(hub_server, "GET", "/api/models/org/nope", auth)[0] == 404  # authenticated: 404
    _, headers, _ = _http(hub_server, "HEAD", "/org/raw/resolve/main/chat_template.jinja")
    assert headers["X-Repo-Commit"] == head  # lets the client cache the file as missing for this commit

    status, headers, body = _http(hub_server, "HEAD", "/org/raw/resolve/main/.gitattributes")
    assert (status, body) == (200, b"")
    assert headers["ETag"] == f'"{git_blob_id(gitattributes)}"' and headers["X-Repo-Commit"] == head
    assert int(headers["Content-Length"]) == len(gitattributes)
    status, headers, body = _http(hub_server, "GET", f"/org/raw/resolve/{head}/.gitattributes", {"Range": "bytes=5-"})
    assert (status, body) == (206, gitattributes[5:])
    assert headers["Content-Range"] == f"bytes 5-{len(gitattributes) - 1}/{len(gitattributes)}"
    assert _http(hub_server, "GET", "/org/raw/resolve/main/.gitattributes", {"Range": "bytes=99999-"})[0] == 416

    commit = b'{"key": "header", "value": {"summary": "x"}}\n'
    assert _http(hub_server, "POST", "/api/models/org/raw/commit/main", {}, commit)[0] == 401
    status, headers, _ = _http(hub_server, "POST", "/api/models/org/raw/commit/main",
                               {"Authorization": "Bearer hf_wrong"}, commit)
    assert (status, headers["X-Error-Message"]) == (401, "Invalid credentials in Authorization header")
    stale = b'{"key": "header", "value": {"summary": "x", "parentCommit": "' + b"0" * 40 + b'"}}\n'
    assert _http(hub_server, "POST", "/api/models/org/raw/commit/main", auth, stale)[0] == 412
    lfs = b'{"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "' + b"a" * 64 + b'", "size": 1}}\n'
    assert _http(hub_server, "POST", "/api/models/org/raw/commit/main", auth, commit + lfs)[0] == 400
    assert hub_server.head("org/raw") == head  # none of these commits landed
    assert not hub_server.errors


def _training_folder(folder: Path) -> None:
    """A saved tiny model + processor with the files a `sparsemoe-vlm train` run leaves (metrics, settings, plot)."""
    from hf_sparsemoe_vlm.app.model_card import write_model_card
    from hf_sparsemoe_vlm.app.training import plot_expert_load

    from tiny_models import make_processor_and_model

    processor, model = make_processor_and_model()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps({"test_exact_match": 0.75, "train_minutes": 1.0}))
    (folder / "run_args.json").write_text(json.dumps({"model": {"preset": "tiny"}, "data": {"dataset": "synthetic"},
                                                      "world_size": 1}))
    plot_expert_load({"text": torch.ones(2, 4), "image": torch.ones(2, 2)}, folder / "expert_load.png")
    write_model_card(model, folder, model_id="local-run")


@pytest.mark.slow
def test_push_command_uploads_model_processor_card_and_plot_in_one_commit(hub_server, tmp_path):
    folder = tmp_path / "run"
    _training_folder(folder)
    result = run_client(hub_server, tmp_path / "hf_home", f"""
        from hf_sparsemoe_vlm.app.cli import main
        raise SystemExit(main(["push", {str(folder)!r}, "org/pushed-run"]))
    """)
    assert "Pushed" in result.stdout and "org/pushed-run" in result.stdout
    files = hub_server.files("org/pushed-run")
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md",
                 "expert_load.png", "modeling_sparsemoe_vlm.py", "configuration_sparsemoe_vlm.py"):
        assert name in files, name
    assert files["expert_load.png"] == (folder / "expert_load.png").read_bytes()
    # Run bookkeeping stays local; its numbers are in the card.
    assert not {"all_results.json", "run_args.json"} & set(files)
    # The card is regenerated for the repository id and keeps the run's results.
    card = files["README.md"].decode()
    assert 'from_pretrained("org/pushed-run", trust_remote_code=True)' in card and "local-run" not in card
    assert "value: 0.75" in card and "(expert_load.png)" in card, card
    commits = [(method, path) for method, path, status in hub_server.requests
               if method == "POST" and "/commit/" in path and "pushed-run" in path and status == 200]
    assert len(commits) == 1
    assert ("POST", "/api/validate-yaml", 200) in hub_server.requests  # the card passed the Hub's metadata checks
    # Each of the card's usage snippets (Auto classes, pipeline, device_map) runs on its own, as written, in a fresh
    # process against the pushed repo.
    # No image file is provided: the snippets draw their own example image.
    snippets = [block.split("```")[0] for block in card.split("```python\n")[1:]]
    assert len(snippets) == 3 and "pipeline(" in snippets[1] and 'device_map="auto"' in snippets[2]
    assert all("Image.new(" in snippet for snippet in snippets[:2]) and not list(tmp_path.glob("*.png"))
    for number, snippet in enumerate(snippets):
        result = run_client(hub_server, tmp_path / f"hf_home_snippet{number}", snippet)
        assert result.stdout.strip(), snippet  # each prints its answer / placement
    assert "cpu" in result.stdout  # the device_map snippet, on this GPU-less machine: everything on the CPU
    # The pushed repo loads by id with remote code and gives the folder's logits.
    run_client(hub_server, tmp_path / "hf_home2", f"""
        import torch
        from transformers import AutoModelForImageTextToText
        local = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True)
        hub = AutoModelForImageTextToText.from_pretrained("org/pushed-run", trust_remote_code=True)
        ids = torch.tensor([[1, 5, 6, 7]])
        torch.testing.assert_close(hub(input_ids=ids).logits, local(input_ids=ids).logits, rtol=0, atol=1e-6)
    """)


@pytest.mark.slow
def test_push_command_refuses_a_folder_that_does_not_load(hub_server, tmp_path):
    folder = tmp_path / "run"
    _training_folder(folder)
    (folder / "model.safetensors").write_bytes(b"truncated")
    script = f"""
        from hf_sparsemoe_vlm.app.cli import main
        try:
            main(["push", {str(folder)!r}, "org/never-created"])
        except SystemExit as error:
            print("EXIT:", error)
    """
    result = run_client(hub_server, tmp_path / "hf_home", script)
    assert "Refusing to upload" in result.stdout and "it does not load" in result.stdout
    assert "org/never-created" not in hub_server.repos
    (folder / "README.md").unlink()
    result = run_client(hub_server, tmp_path / "hf_home", script.replace(str(folder), str(tmp_path / "empty")))
    assert "no config.json there" in result.stdout


@pytest.mark.slow
def test_push_command_to_a_branch_without_the_plot(hub_server, tmp_path):
    folder = tmp_path / "run"
    _training_folder(folder)
    run_client(hub_server, tmp_path / "hf_home", f"""
        from hf_sparsemoe_vlm.app.cli import main
        raise SystemExit(main(["push", {str(folder)!r}, "org/branch-run", "--revision", "dev", "--no_include_plot",
                               "--datasets", "org/shapes-vqa,org/shapes-captions"]))
    """)
    files = hub_server.files("org/branch-run", revision="dev")
    assert "model.safetensors" in files and "expert_load.png" not in files
    assert "expert_load.png" not in files["README.md"].decode()  # no link to a picture that is not there
    from huggingface_hub import ModelCard

    assert ModelCard(files["README.md"].decode()).data.datasets == ["org/shapes-vqa", "org/shapes-captions"]
    assert "model.safetensors" not in hub_server.files("org/branch-run", revision="main")


@pytest.mark.slow
def test_push_command_with_a_rejected_token_exits_cleanly_and_commits_nothing(hub_server, tmp_path):
    folder = tmp_path / "run"
    _training_folder(folder)
    script = f"""
        from hf_sparsemoe_vlm.app.cli import main
        try:
            main(["push", {str(folder)!r}, "org/tiny-sparsemoe-vlm"])
        except SystemExit as error:
            print("EXIT:", error)
    """
    head = hub_server.head(REPO) if REPO in hub_server.repos else None
    result = run_client(hub_server, tmp_path / "hf_home", script, HF_TOKEN="hf_not_a_valid_token")
    assert "EXIT: Push of" in result.stdout
    assert "failed while trying to create the repository; none of its files were uploaded" in result.stdout
    assert "401" in result.stdout and "Check the token" in result.stdout
    assert (hub_server.head(REPO) if REPO in hub_server.repos else None) == head
    # An unreachable endpoint is reported the same way, naming the endpoint.
    result = run_client(hub_server, tmp_path / "hf_home", script, HF_ENDPOINT="http://127.0.0.1:9")
    assert "none of its files were uploaded" in result.stdout and "http://127.0.0.1:9" in result.stdout
    # The repository exists but the upload commit fails: the message says which step failed; no file landed.
    result = run_client(hub_server, tmp_path / "hf_home", """
        from huggingface_hub import HfApi

        def rejected(self, **kwargs):  # e.g. a proxy refusing the upload after the repository was created
            raise OSError("413 Client Error: Payload Too Large")

        HfApi.upload_folder = rejected
    """, script.replace("org/tiny-sparsemoe-vlm", "org/upload-fails"))
    assert "failed while trying to upload the files; none of its files were uploaded" in result.stdout
    assert "Payload Too Large" in result.stdout
    assert "model.safetensors" not in hub_server.files("org/upload-fails")


def test_push_command_refuses_an_invalid_repo_id_before_loading_anything(tmp_path):
    from hf_sparsemoe_vlm.app.cli import main

    with pytest.raises(SystemExit, match=r"Refusing to push to 'org/bad name!': Repo id must use alphanumeric"):
        main(["push", str(tmp_path / "not-even-a-folder"), "org/bad name!"])


def test_push_command_refuses_a_processor_that_does_not_match_the_model(tmp_path):
    from hf_sparsemoe_vlm.app.cli import main

    folder = tmp_path / "run"
    _training_folder(folder)
    config_path = folder / "processor_config.json"
    processor_config = json.loads(config_path.read_text())
    processor_config["image_seq_length"] = 3
    config_path.write_text(json.dumps(processor_config))
    with pytest.raises(SystemExit, match=r"processor does not match the model .*image tokens 3 vs 16"):
        main(["push", str(folder), "org/never"])  # refused before any Hub call (this process is offline)


def test_the_suite_itself_runs_offline_with_a_private_hf_home_and_no_token():
    """conftest.py isolates this process: nothing of the user's Hub cache, token or remote-code modules is used."""
    import os
    import tempfile

    from huggingface_hub import constants, get_token

    assert constants.HF_HUB_OFFLINE and constants.HF_HOME == os.environ["HF_HOME"]
    assert constants.HF_HOME.startswith(tempfile.gettempdir()) and get_token() is None


def test_card_metadata_validation_accepts_our_cards_and_names_what_the_hub_would_reject(tmp_path):
    from hub_server import card_metadata_errors

    from hf_sparsemoe_vlm.app.model_card import build_model_card

    _training_folder(tmp_path / "run")
    card = str(build_model_card(make_processor_and_model()[1], "org/x", tmp_path / "run",
                                base_model="llava-hf/llava-1.5-7b-hf", datasets=["org/vqa"]))
    assert card_metadata_errors(card) == []
    for old, new, reason in [
        ("license: apache-2.0", "license: not-a-license", '"license" must be one of'),
        ("pipeline_tag: image-text-to-text", "pipeline_tag: image-chat", '"pipeline_tag" must be a Hub task'),
        ("- org/vqa", "- org/vqa/extra/parts", '"datasets" entry \'org/vqa/extra/parts\' is not a repo id'),
        ("    - type: exact_match", "    - kind: exact_match", '"model-index" is malformed'),
    ]:
        assert old in card, old
        assert any(reason in error for error in card_metadata_errors(card.replace(old, new, 1))), reason
    assert card_metadata_errors("---\n[1, 2]\n---\n# card") == ["The card metadata must be a YAML mapping."]


@pytest.mark.slow
def test_push_command_refuses_a_card_the_hub_rejects_before_creating_the_repo(hub_server, tmp_path):
    folder = tmp_path / "run"
    _training_folder(folder)
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("license: apache-2.0", "license: my-own-license", 1))
    result = run_client(hub_server, tmp_path / "hf_home", f"""
        from hf_sparsemoe_vlm.app.cli import main
        try:
            main(["push", {str(folder)!r}, "org/bad-card", "--keep_card"])
        except SystemExit as error:
            print("EXIT:", error)
    """)
    assert "failed while trying to validate the model card's metadata; none of its files were uploaded" in result.stdout
    assert "\"license\" must be one of the Hub's license identifiers, got 'my-own-license'" in result.stdout
    assert "org/bad-card" not in hub_server.repos


@pytest.mark.slow
def test_push_command_keeps_a_converted_models_base_model_and_creates_a_private_repo(hub_server, tmp_path):
    from hf_sparsemoe_vlm.app.model_card import write_model_card

    folder = tmp_path / "upcycled"
    processor, model = make_processor_and_model()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # What a conversion script leaves: conversion.json and a card naming the base model, no training run.
    (folder / "conversion.json").write_text(json.dumps({"base_model": "llava-hf/llava-1.5-7b-hf",
                                                        "method": "sparse upcycling of LLaVA"}))
    write_model_card(model, folder, model_id="upcycled", license="llama2")
    run_client(hub_server, tmp_path / "hf_home", f"""
        from hf_sparsemoe_vlm.app.cli import main
        raise SystemExit(main(["push", {str(folder)!r}, "org/private-upcycled", "--private"]))
    """)
    assert hub_server.repos["org/private-upcycled"].private
    from huggingface_hub import ModelCard

    card = ModelCard(hub_server.files("org/private-upcycled")["README.md"].decode())
    assert card.data.base_model == "llava-hf/llava-1.5-7b-hf" and card.data.license == "llama2"
    assert "(sparse upcycling of LLaVA)" in card.text and "## Training" not in card.text
    # Private: without the token the repo is invisible (the Hub's 401 RepoNotFound for anonymous callers).
    result = run_client(hub_server, tmp_path / "hf_home_anonymous", """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RepositoryNotFoundError
        try:
            hf_hub_download("org/private-upcycled", "config.json")
        except RepositoryNotFoundError as error:
            print("NOT FOUND", error.response.status_code)
    """, HF_TOKEN=None)
    assert "NOT FOUND 401" in result.stdout


def test_push_command_refuses_a_checkpoint_with_a_missing_tensor(tmp_path):
    """A tensor missing from model.safetensors loads as fresh random weights with only a warning: uploading that
    would publish a broken model."""
    from safetensors.torch import load_file, save_file

    from hf_sparsemoe_vlm.app.cli import main

    folder = tmp_path / "run"
    _training_folder(folder)
    weights = load_file(folder / "model.safetensors")
    weights.pop("model.language_model.layers.0.mlp.text_moe.experts.down_proj")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"weights do not match its config \(missing keys: \['model.language_model"
                                         r"\.layers\.0\.mlp\.text_moe\.experts\.down_proj'\]\)"):
        main(["push", str(folder), "org/never"])  # refused before any Hub call (this process is offline)


@pytest.mark.parametrize("revision", ["bad name", "v1..v2", "-x", "feature/", "x.lock", "a:b"])
def test_push_command_refuses_an_invalid_branch_name_before_loading_anything(revision, tmp_path):
    from hf_sparsemoe_vlm.app.cli import main

    with pytest.raises(SystemExit, match="not a valid git branch name"):
        main(["push", str(tmp_path / "not-even-a-folder"), "org/model", f"--revision={revision}"])
