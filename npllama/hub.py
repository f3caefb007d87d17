"""Hugging Face Hub ids as model paths: ``npllama.load("org/name")``, ``"org/name@revision"``,
``--model org/name``.

A model path that exists on disk is always that file or folder. A path that does not exist and
reads as a Hub id is looked up through ``huggingface_hub``'s own cache, as transformers does:

    org/name                   the repository's main branch      snapshot_download
    org/name@revision          a branch, tag or commit           snapshot_download(revision=...)
    org/name/file.gguf[@rev]   one GGUF file of a repository     hf_hub_download

Only the files npllama reads are fetched (HUB_FILES, top-level only): a Llama 3 repository also
holds Meta's ``original/consolidated.*.pth``, which would double the download. The cache is
huggingface_hub's ($HF_HUB_CACHE, else $HF_HOME/hub), read at each call, as are $HF_HUB_OFFLINE
(then nothing is asked of the Hub and the cache must hold the snapshot) and $HF_ENDPOINT.
Private and gated repositories use the token of $HF_TOKEN (or ``hf auth login``).

Every failure is one line (CheckpointError) that names both readings of the path: no such local
file or folder, and what the Hub said, with what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

# The files of a Hugging Face model folder that npllama reads (formats/hf.py), matched at the
# repository's top level only (IGNORED keeps out original/, onnx/, and any other subfolder).
HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json", "chat_template.jinja",
             "*.safetensors", "model.safetensors.index.json")
IGNORED = ("*/*",)

# The Hub's repository names: letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?P<file>(?:/[^@/]+)*/[^@/]+\.gguf)?(?:@(?P<revision>[^@\s]+))?")


@dataclass(frozen=True)
class HubId:
    """A parsed Hub id: the repository, one file in it (a .gguf) or None, the revision or None (main)."""
    repo: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"/{self.filename}" if self.filename else "") + (f"@{self.revision}" if self.revision else "")


# A name that ends like a checkpoint file is a local path mistyped, not a repository (dir/model.gguf).
_FILE_SUFFIXES = (".gguf", ".safetensors", ".pth", ".bin", ".json", ".model", ".jinja")


def parse_hub_id(text: str) -> HubId | None:
    """The Hub id ``text`` spells (org/name, org/name@rev, org/name/file.gguf[@rev]), or None."""
    m = _HUB_ID.fullmatch(text)
    if m is None or "--" in m["repo"] or ".." in m["repo"] or m["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    return HubId(m["repo"], m["file"][1:] if m["file"] else None, m["revision"])


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The local file or folder a model path names: the path itself when it exists (or does not
    read as a Hub id), else the Hub id's snapshot in huggingface_hub's cache (fetched if needed)."""
    text = os.fspath(path)
    local = Path(text).expanduser()
    if os.path.lexists(local):
        return local
    hub_id = parse_hub_id(text) if isinstance(text, str) else None
    if hub_id is None:
        return local                 # detect_format says there is no such file or folder
    return fetch(hub_id, text)


def hub_cache() -> Path:
    """huggingface_hub's cache folder as the environment says now: $HF_HUB_CACHE, else $HF_HOME/hub,
    else the library's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """Is $HF_HUB_OFFLINE set (1, true, yes, on), now?"""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch(hub_id: HubId, text: str | None = None) -> Path:
    """The snapshot folder (or the GGUF file) of ``hub_id`` in the cache, downloading what is missing
    unless offline; CheckpointError in one line otherwise. ``text``: the path as the user wrote it."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{text or hub_id}: no such local file or folder; reading it as a Hugging Face Hub "
                              f"id needs huggingface_hub (pip install huggingface_hub)") from None
    kwargs = dict(revision=hub_id.revision, cache_dir=hub_cache(), local_files_only=offline(),
                  endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        if hub_id.filename:
            return Path(huggingface_hub.hf_hub_download(hub_id.repo, hub_id.filename, **kwargs))
        folder = Path(huggingface_hub.snapshot_download(hub_id.repo, allow_patterns=list(HUB_FILES),
                                                        ignore_patterns=list(IGNORED), **kwargs))
    except Exception as e:   # huggingface_hub's errors, and OSError from the cache
        raise CheckpointError(f"{text or hub_id}: no such local file or folder, and as a Hugging Face Hub id: "
                              f"{hub_error_line(e, hub_id)}") from None
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{text or hub_id}: no such local file or folder, and the Hub repository "
                              f"{hub_id.repo} has no config.json at its top level (the snapshot is {folder}); "
                              f"for a GGUF repository name one file: {hub_id.repo}/FILE.gguf")
    return folder


def hub_error_line(e: Exception, hub_id: HubId) -> str:
    """What the Hub (or the cache) said, and what to do, in one line."""
    from huggingface_hub import errors

    repo = hub_id.repo
    cause = e.__cause__ or e.__context__
    if isinstance(e, errors.LocalEntryNotFoundError) and isinstance(cause, errors.HfHubHTTPError):
        e = cause                    # the Hub answered (and the cache had nothing): say what it answered
    status = getattr(getattr(e, "response", None), "status_code", None)
    token = "set HF_TOKEN to a token of an account that has access (or run `hf auth login`)"
    if isinstance(e, errors.GatedRepoError) or (isinstance(e, errors.HfHubHTTPError) and status == 403):
        return (f"{repo} is a gated repository: accept its licence on the model's page on the Hub, then "
                f"{token}")
    if isinstance(e, errors.RepositoryNotFoundError) or (isinstance(e, errors.HfHubHTTPError) and status == 401):
        return (f"the Hub has no repository {repo} that this machine may read (a typo? if it is private or "
                f"gated, {token})")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"the repository {repo} has no revision {hub_id.revision!r}; name a branch, tag or commit it has"
    if isinstance(e, errors.LocalEntryNotFoundError):
        where = f"{repo}" + (f" at revision {hub_id.revision}" if hub_id.revision else "")
        if offline() or isinstance(cause, errors.OfflineModeIsEnabled):
            return (f"{where} is not in the Hub cache {hub_cache()}, and HF_HUB_OFFLINE is set; fetch it where "
                    f"the Hub is reachable (`hf download {repo}`) and copy that cache here, or download the "
                    f"folder and pass its path")
        said = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:120]})" if cause else ""
        return (f"the Hub cannot be reached{said} and {where} is not in the Hub cache {hub_cache()}; "
                f"download the model on a machine with access (`hf download {repo} --local-dir DIR`) and copy "
                f"the folder here, passing its path, or copy a populated Hub cache here and set HF_HUB_OFFLINE=1")
    # (huggingface_hub < 1.0 has no RemoteEntryNotFoundError: there EntryNotFoundError is the Hub's 404)
    if isinstance(e, getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)):
        return f"the repository {repo} has no file {hub_id.filename!r}; check the name in its file list"
    if isinstance(e, errors.HfHubHTTPError):
        return f"the Hub answered {status or 'an error'}: {str(e).splitlines()[0][:200]}"
    if isinstance(e, errors.HFValidationError):
        return f"not a valid repository id ({str(e).splitlines()[0][:200]})"
    if isinstance(e, OSError):
        return f"the Hub cache {hub_cache()} cannot be used ({e.strerror or e}); set HF_HUB_CACHE to a writable folder"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
