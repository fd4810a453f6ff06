"""A stand-in for the Hugging Face Hub that records repository creations and commits (no network)."""

import os


class HubRecorder:
    """Replaces `HfApi.create_repo` / `create_commit` / `create_branch` and the Hub's YAML check
    with recorders; `calls` lists `("create_repo", repo_id)` and
    `("create_commit", repo_id, message, {path_in_repo: bytes})` in order. A bare repository name
    belongs to the user `USER`, as the Hub resolves it for the token's owner.

    `upload_folder` runs for real up to its commit: the folder is listed and filtered by
    huggingface_hub itself, then committed through the recorded `create_commit` (the single-commit
    path it takes without hf_xet; with hf_xet it streams to the Hub instead).
    """

    USER = "me"

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch):
        import huggingface_hub
        from huggingface_hub import hf_api
        from huggingface_hub.errors import EntryNotFoundError

        recorder = self

        def create_repo(self, repo_id, **kwargs):
            repo_id = repo_id if "/" in repo_id else f"{recorder.USER}/{repo_id}"
            recorder.calls.append(("create_repo", repo_id))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                if isinstance(source, (str, os.PathLike)):
                    with open(source, "rb") as f:
                        files[op.path_in_repo] = f.read()
                else:
                    files[op.path_in_repo] = bytes(source)
            recorder.calls.append(("create_commit", repo_id, commit_message, files))

        def no_remote_card(*args, **kwargs):
            raise EntryNotFoundError("no README.md on the (recorded) Hub")

        def validate_yaml(self, content, **kwargs):
            recorder.calls.append(("validate_yaml", content))

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the recorder is the Hub
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda *a, **k: None)
        monkeypatch.setattr(huggingface_hub.HfApi, "_validate_yaml", validate_yaml)
        monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)
        monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(no_remote_card))
        return self

    def commits(self):
        return [c for c in self.calls if c[0] == "create_commit"]
