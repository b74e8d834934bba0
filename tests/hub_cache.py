"""A local folder laid out as a Hugging Face Hub cache stands in for the Hub in tests (nothing goes online):
``publish`` lays a checkpoint folder out as a download of a repo at a commit, ``RecordingHubApi`` replaces
``HfApi`` in ``push_to_hub`` and publishes what it is given, ``offline_cache`` makes the cache the default one
with every network request refused."""
import hashlib
import shutil

import huggingface_hub.constants
import huggingface_hub.hub_mixin


def offline_cache(monkeypatch, cache):
    """Makes ``cache`` the default Hugging Face cache and refuses every network request (offline mode)."""
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def publish(folder, cache, repo_id: str, refs=("main",)) -> str:
    """Lays ``folder`` out in ``cache`` as the Hub leaves a download of ``repo_id``: the files under
    snapshots/<commit>/, each named ref pointing at that commit. Returns the commit."""
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    commit = digest.hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


class RecordingHubApi:
    """Stands in for huggingface_hub.HfApi in push_to_hub (patch ``huggingface_hub.hub_mixin.HfApi`` and set
    ``cache``): records the calls and publishes the uploaded folder into the cache, as a later download of the
    branch would see it."""

    calls: list = []
    cache = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        RecordingHubApi.calls.append(("create_repo", repo_id, private))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, revision=None, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*") if p.is_file())
        RecordingHubApi.calls.append(("upload_folder", repo_id, revision, files))
        commit = publish(folder_path, RecordingHubApi.cache, repo_id, refs=(revision or "main",))
        return f"https://huggingface.co/{repo_id}/commit/{commit}"


def record_pushes(monkeypatch, cache):
    """push_to_hub goes to ``cache`` through :class:`RecordingHubApi`; returns its call list."""
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", RecordingHubApi)
    monkeypatch.setattr(RecordingHubApi, "calls", [])
    monkeypatch.setattr(RecordingHubApi, "cache", cache)
    return RecordingHubApi.calls
