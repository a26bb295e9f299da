"""Downloads from the Hugging Face hub: ``oogiri model pull`` and the Oogiri-GO data set.

The only place oogiri downloads anything, and only when an operator asks. ``huggingface_hub``'s
``snapshot_download`` does the transfer (parallel, resumable: an interrupted file continues from
its ``.incomplete`` part with a ``Range`` request); this module adds what an operator needs on top:

- the endpoint and the token are read when the command runs (``HF_ENDPOINT``, ``HF_TOKEN``), not
  when ``huggingface_hub`` was first imported, so a mirror set in the environment always applies;
- offline mode (``--offline`` or ``HF_HUB_OFFLINE=1``) uses a complete earlier copy and never
  touches the network;
- every file is checked against the hub's own listing after the download (LFS files by their
  sha256, the others by their git blob id, all by size); a mismatch deletes the bad file so the
  next pull fetches it again, and the pull fails with the names;
- ``oogiri-pull.json`` in the folder records repository, commit and checksums: the proof that the
  copy is complete, and what offline mode trusts.

The token never reaches a log or an error message (``redact``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "OpenGVLab/InternVL2-2B"
DEFAULT_ENDPOINT = "https://huggingface.co"
PULL_MARKER = "oogiri-pull.json"
REPO_TYPES = ("model", "dataset")


class HubError(Exception):
    """A download that did not happen or did not check out; the message says what to do."""


@dataclass
class HubFile:
    """One file of the hub's listing: what the download must match."""

    path: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1 (non-LFS files)


@dataclass
class Snapshot:
    repo: str
    repo_type: str
    revision: str
    commit: str
    path: Path
    files: list[HubFile] = field(default_factory=list)
    offline: bool = False
    endpoint: str = DEFAULT_ENDPOINT

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.path),
            "files": len(self.files),
            "bytes": self.bytes,
            "offline": self.offline,
            "endpoint": self.endpoint,
        }


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    # a token read from a secrets file keeps its newline: never part of the token, and an
    # illegal header value (which HTTP libraries quote back in their errors)
    raw = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or ""
    return raw.strip() or None


def _raw_tokens() -> list[str]:
    return [t for t in (os.environ.get(v) for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")) if t]


def offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def redact(text: str, secret: str | None = None) -> str:
    """``text`` without the token (errors of HTTP libraries may quote request headers, escaped:
    ``b'Bearer hf_…\\n'``), as given or as in the environment."""
    secrets = [secret] if secret is not None else _raw_tokens()
    forms: set[str] = set()
    for s in secrets:
        forms |= {s, s.strip(), repr(s)[1:-1], repr(s.encode("utf-8"))[2:-1]}
    for form in sorted((f for f in forms if f), key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def default_dest(root: Path, repo: str) -> Path:
    """``root/<owner>--<name>``: one folder per repository, readable names."""
    return Path(root) / repo.replace("/", "--")


def _inside(path: str) -> bool:
    """A listed name that stays inside the download folder (no ``..``, not absolute)."""
    parts = path.replace("\\", "/").split("/")
    return bool(path) and not path.startswith(("/", "\\")) and ".." not in parts


def _matches(path: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(path, p) for p in patterns)


ProgressSink = Callable[[int, int | None, str], None]


def _reporting_bar(sink: ProgressSink, what: str) -> type:
    """A stand-in for tqdm that ``snapshot_download`` updates: the bytes go to ``sink`` (a
    command's own progress display) instead of a tqdm bar, which inside rich's live display
    showed nothing until the download ended (rich holds a line until its newline)."""
    lock = threading.Lock()
    seen = [0, 0]  # bytes done, bytes in all

    class Bar:
        def __init__(self, *args: Any, **kw: Any) -> None:
            self.n = int(kw.get("initial") or 0)
            self.total = kw.get("total")
            self.counts_bytes = kw.get("unit") == "B"

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            if not self.counts_bytes:
                return
            with lock:
                seen[0] = max(seen[0], self.n)
                seen[1] = max(seen[1], int(self.total or 0), seen[0])
                done, total = seen
            sink(done, total or None, what)

        def refresh(self, *args: Any, **kw: Any) -> None: ...

        def close(self) -> None: ...

        def set_description(self, *args: Any, **kw: Any) -> None: ...

        def set_description_str(self, *args: Any, **kw: Any) -> None: ...

        def set_postfix_str(self, *args: Any, **kw: Any) -> None: ...

        @property
        def format_dict(self) -> dict[str, Any]:
            return {"rate": None}

    return Bar


def file_digest(path: Path, algo: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algo)
    h.update(prefix)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path, files: Sequence[HubFile]) -> list[str]:
    """Problems of ``folder`` against the hub's listing (empty: the copy is exact)."""
    problems = []
    for f in files:
        local = folder / f.path
        if not local.is_file():
            problems.append(f"{f.path}: missing")
            continue
        size = local.stat().st_size
        if size != f.size:
            problems.append(f"{f.path}: {size} bytes, the hub lists {f.size}")
        elif f.sha256 and file_digest(local, "sha256") != f.sha256:
            problems.append(f"{f.path}: sha256 differs from the hub's")
        elif not f.sha256 and f.blob_id:
            if file_digest(local, "sha1", f"blob {size}\0".encode()) != f.blob_id:
                problems.append(f"{f.path}: git blob id differs from the hub's")
    return problems


def _forget(folder: Path, path: str) -> None:
    """Drop a bad file and huggingface_hub's note of it, so the next pull fetches it anew."""
    (folder / path).unlink(missing_ok=True)
    meta = folder / ".cache" / "huggingface" / "download" / f"{path}.metadata"
    meta.unlink(missing_ok=True)


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(folder) / PULL_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _from_marker(folder: Path, marker: dict[str, Any]) -> Snapshot:
    files = [HubFile(**f) for f in marker.get("files", [])]
    return Snapshot(
        repo=marker["repo"],
        repo_type=marker["repo_type"],
        revision=marker["revision"],
        commit=marker["commit"],
        path=folder,
        files=files,
        offline=True,
        endpoint=marker.get("endpoint", DEFAULT_ENDPOINT),
    )


def local_copy(
    folder: Path,
    repo: str,
    repo_type: str = "model",
    revision: str | None = None,
    patterns: Sequence[str] | None = None,
    check: bool = True,
) -> Snapshot | None:
    """A complete earlier pull of ``repo`` in ``folder`` (sizes checked; hashes when ``check``)."""
    marker = read_marker(folder)
    if not marker or marker.get("repo") != repo or marker.get("repo_type") != repo_type:
        return None
    if revision not in (None, marker.get("revision"), marker.get("commit")):
        return None
    snap = _from_marker(Path(folder), marker)
    if patterns is not None:
        have = {f.path for f in snap.files}
        if not all(any(fnmatch.fnmatch(p, pat) for p in have) for pat in patterns):
            return None
    if check:
        if verify(snap.path, snap.files):
            return None
    else:
        for f in snap.files:
            local = snap.path / f.path
            if not local.is_file() or local.stat().st_size != f.size:
                return None
    return snap


def _friendly(exc: Exception, repo: str, repo_type: str, revision: str, where: str) -> HubError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = "data set" if repo_type == "dataset" else "model"
    if isinstance(exc, GatedRepoError):
        msg = f"{kind} {repo} is gated on {where}: accept its terms there and set HF_TOKEN"
    elif isinstance(exc, RevisionNotFoundError):
        msg = f"{kind} {repo} has no revision {revision!r} on {where}"
    elif isinstance(exc, RepositoryNotFoundError):
        msg = f"{kind} {repo} not found on {where} (a private repository needs HF_TOKEN)"
    elif isinstance(exc, LocalEntryNotFoundError):
        msg = (
            f"cannot reach {where} and there is no complete copy of {repo}: check the network, "
            "set HF_ENDPOINT to a mirror, or pull on a connected machine and copy the folder"
        )
    elif isinstance(exc, HfHubHTTPError):
        msg = f"{where} answered with an error for {repo}: {exc}"
    else:
        msg = f"download of {repo} from {where} failed: {type(exc).__name__}: {exc}"
    # redacted before it is cut to one line: a token with a line break would be cut in two
    lines = redact(msg or str(exc)).splitlines()
    return HubError(lines[0] if lines else type(exc).__name__)


def pull(
    repo: str,
    dest: Path,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    patterns: Sequence[str] | None = None,
    offline: bool | None = None,
    progress: bool = True,
    max_workers: int = 8,
    on_progress: ProgressSink | None = None,
) -> Snapshot:
    """Download (or complete) ``repo`` at ``revision`` into ``dest`` and check every file.

    A folder already holding this commit is only checked; an interrupted pull resumes.
    ``on_progress(done, total, what)`` gets the bytes instead of huggingface_hub's tqdm bars.
    """
    if repo_type not in REPO_TYPES:
        raise HubError(f"repo_type must be one of {REPO_TYPES}, not {repo_type!r}")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"a hub repository is OWNER/NAME, not {repo!r}")
    dest = Path(dest).expanduser()
    offline = offline_env() if offline is None else offline
    where = endpoint()
    if offline:
        snap = local_copy(dest, repo, repo_type, revision, patterns)
        if snap is None:
            raise HubError(
                f"offline: no complete copy of {repo} in {dest} (pull it once online, or copy "
                "a pulled folder there)"
            )
        return snap

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    api = HfApi(endpoint=where, token=token())
    rev = revision or "main"
    try:
        info = api.repo_info(repo, repo_type=repo_type, revision=rev)
        commit = str(info.sha)
        listing = [
            f
            for f in api.list_repo_tree(repo, repo_type=repo_type, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        ]
    except Exception as exc:
        raise _friendly(exc, repo, repo_type, rev, where) from None
    files = [
        HubFile(
            path=f.path,
            size=int(f.lfs.size if f.lfs is not None else f.size),
            sha256=f.lfs.sha256 if f.lfs is not None else None,
            blob_id=None if f.lfs is not None else f.blob_id,
        )
        for f in listing
        if _matches(f.path, patterns)
    ]
    outside = [f.path for f in files if not _inside(f.path)]
    if outside:
        # refused here, not left to huggingface_hub (only recent versions check, file by file)
        raise HubError(
            f"{repo}@{commit[:8]} lists file names that point outside its folder, refused: "
            + ", ".join(repr(p) for p in outside[:5])
        )
    if patterns is not None:
        missing = [p for p in patterns if not any(fnmatch.fnmatch(f.path, p) for f in files)]
        if missing:
            raise HubError(f"{repo}@{commit[:8]} has no file matching {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    old = read_marker(dest)
    if old is not None and (old.get("commit"), old.get("repo")) != (commit, repo):
        # the download replaces files of the recorded copy one by one: until it has finished
        # and checked out, the folder is no complete copy of anything
        (dest / PULL_MARKER).unlink(missing_ok=True)
    if not progress:
        disable_progress_bars()
    try:
        snapshot_download(
            repo,
            repo_type=repo_type,
            revision=commit,
            local_dir=dest,
            endpoint=where,
            token=token(),
            allow_patterns=list(patterns) if patterns is not None else None,
            max_workers=max_workers,
            tqdm_class=(
                _reporting_bar(on_progress, f"download {repo}")
                if progress and on_progress is not None
                else None
            ),
        )
    except Exception as exc:
        raise _friendly(exc, repo, repo_type, rev, where) from None
    finally:
        if not progress:
            enable_progress_bars()
    problems = verify(dest, files)
    if problems:
        for problem in problems:
            _forget(dest, problem.split(":", 1)[0])
        raise HubError(
            f"{repo}@{commit[:8]}: {len(problems)} file(s) did not check out and were removed "
            f"(pull again): {'; '.join(problems[:5])}"
        )
    snap = Snapshot(repo, repo_type, rev, commit, dest, files, False, where)
    marker = {
        "repo": repo,
        "repo_type": repo_type,
        "revision": rev,
        "commit": commit,
        "endpoint": where,
        "pulled_at": datetime.now(UTC).isoformat(),
        "files": [asdict(f) for f in files],
    }
    tmp = dest / f".{PULL_MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    tmp.replace(dest / PULL_MARKER)
    return snap


def model_label(snap: Snapshot) -> str:
    """The registry's name for a pulled model: ``InternVL2-2B@1a2b3c4d``."""
    return f"{snap.repo.split('/')[-1]}@{snap.commit[:8]}"


async def register_model(store: Any, snap: Snapshot) -> tuple[str, bool]:
    """Add the pulled folder to the model registry (once per commit). Returns (version, new)."""
    version = model_label(snap)
    if await store.get_model_version(version) is not None:
        return version, False
    await store.add_model_version(
        version,
        str(snap.path),
        status="pulled",
        data_card={"origin": "hub", **snap.as_dict()},
    )
    return version, True


def remove_partial(dest: Path) -> None:
    """Forget an unfinished pull entirely (``--force``)."""
    shutil.rmtree(dest, ignore_errors=True)
