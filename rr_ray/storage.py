"""Run directory: one API over a local path or ``s3://bucket/prefix``.

Artifacts written through :class:`RunDir` are recorded in ``manifest.json`` (relative path -> sha256, bytes);
``_done/<stage>.json`` is written after everything else of a stage, so a marker means "stage complete".

Concurrency: a single writer (the driver) per run; it keeps the manifest in memory (loaded on open) and
rewrites it after each write, so a second writer would drop entries. Readers may run at any time: every
write is atomic, so a reader sees the old or the new file, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

MANIFEST, DONE_DIR = "manifest.json", "_done"  # reserved names at the run root
RUN_REF = "{run}/"  # a done marker's path inside the run, independent of where the run lives
_TMP_SUFFIX = ".rr-tmp"  # local temp files: hidden, skipped by list()


class StorageError(OSError):
    """An S3 or connection failure, reported as one line naming the URI."""


def _check_rel(rel: str, *, allow_root: bool = False) -> str:
    """Validate a run-relative POSIX path ("" only where ``allow_root``); returns it without a trailing '/'."""
    if rel == "" and allow_root:
        return ""
    why = ("must be a str" if not isinstance(rel, str) else "empty" if not rel
           else "absolute paths are not allowed" if rel.startswith("/")
           else "use '/' as the separator" if "\\" in rel
           else "'..', '.' and empty components are not allowed"
           if any(p in ("", ".", "..") for p in rel.rstrip("/").split("/")) else None)
    if why:
        raise ValueError(f"invalid run-relative path {rel!r}: {why}")
    return rel.rstrip("/")


class _LocalBackend:
    def __init__(self, root: Path) -> None:
        self.root = root  # created lazily by the first write

    def uri(self, rel: str = "") -> str:
        return str(self.root / rel)

    def _atomic(self, path: Path, fill: Callable[[IO[bytes]], None]) -> None:
        # Temp file in the target's directory so os.replace is a same-filesystem rename (atomic on POSIX);
        # os.open with 0o666 (not mkstemp's 0o600) so the final file gets the usual umask permissions.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._atomic(self.root / rel, lambda f: f.write(data))

    def put_file(self, rel: str, src: Path) -> None:
        with open(src, "rb") as s:
            self._atomic(self.root / rel, lambda f: shutil.copyfileobj(s, f))

    def get_bytes(self, rel: str) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{self.uri(rel)}: no such file") from None

    def get_file(self, rel: str, dst: Path) -> None:
        with open(self.root / rel, "rb") as s:
            self._atomic(dst, lambda f: shutil.copyfileobj(s, f))

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def list(self, prefix: str) -> list[str]:
        return [Path(d, n).relative_to(self.root).as_posix() for d, _, names in os.walk(self.root / prefix)
                for n in names if not (n.startswith(".") and n.endswith(_TMP_SUFFIX))]


class _S3Backend:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        self.bucket, self.base, self.endpoint_url = bucket, f"{prefix}/" if prefix else "", endpoint_url
        # boto3 itself honours AWS_ACCESS_KEY_ID/..., AWS_DEFAULT_REGION, AWS_ENDPOINT_URL(_S3), AWS_PROFILE.
        cfg = Config(retries={"mode": "standard", "max_attempts": 3},
                     s3={"addressing_style": "path"} if endpoint_url else None)
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=cfg)
        # Fail on open, in one line, for a missing bucket, bad credentials or an unreachable endpoint.
        with self._errors("", bucket_op=True):
            self.client.head_bucket(Bucket=bucket)

    def uri(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.base}{rel}".rstrip("/")

    @contextmanager
    def _errors(self, rel: str, bucket_op: bool = False) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            code, msg = str(exc.response["Error"].get("Code", "")), exc.response["Error"].get("Message", "")
            if code == "NoSuchBucket" or (bucket_op and code in ("404", "NotFound")):
                raise FileNotFoundError(f"S3 bucket {self.bucket!r} does not exist (for {self.uri()})") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.uri(rel)}: no such object") from None
            raise StorageError(f"{self.uri(rel)}: S3 error {code}: {msg}") from exc
        except (BotoCoreError, Boto3Error) as exc:  # no credentials, endpoint unreachable, failed upload
            raise StorageError(f"{self.uri(rel)}: {exc}") from exc

    # A PutObject (or a completed multipart upload) becomes visible all at once: S3 never serves a
    # partially written object, so no temp-and-rename is needed on this backend.
    def put_bytes(self, rel: str, data: bytes) -> None:
        with self._errors(rel):
            self.client.put_object(Bucket=self.bucket, Key=self.base + rel, Body=data)

    def put_file(self, rel: str, src: Path) -> None:
        with self._errors(rel):  # managed transfer: multipart above 8 MiB, so >5 GB files work
            self.client.upload_file(str(src), self.bucket, self.base + rel)

    def get_bytes(self, rel: str) -> bytes:
        with self._errors(rel):
            return self.client.get_object(Bucket=self.bucket, Key=self.base + rel)["Body"].read()

    def get_file(self, rel: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(rel):  # download_file writes a temp name beside dst, renamed when complete
            self.client.download_file(self.bucket, self.base + rel, str(dst))

    def exists(self, rel: str) -> bool:
        try:
            with self._errors(rel):
                return bool(self.client.head_object(Bucket=self.bucket, Key=self.base + rel))
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.base + (f"{prefix}/" if prefix else ""))
        with self._errors(prefix):
            return [o["Key"][len(self.base):] for page in pages for o in page.get("Contents", [])]


class RunDir:
    """A run directory on local disk or S3, with a manifest of written artifacts and stage-done markers."""

    def __init__(self, backend: _LocalBackend | _S3Backend) -> None:
        self._b, self._lock = backend, threading.Lock()
        try:
            self._manifest: dict[str, dict[str, Any]] = json.loads(backend.get_bytes(MANIFEST))
        except FileNotFoundError:  # a new run
            self._manifest = {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{backend.uri(MANIFEST)}: not valid JSON ({exc})") from None

    @classmethod
    def open(cls, uri: str, *, endpoint_url: str | None = None) -> RunDir:
        """Open a local path or ``s3://bucket/prefix``; a local directory is only created by the first write."""
        if uri.startswith("s3://"):
            bucket, _, prefix = uri[5:].partition("/")
            if not bucket:
                raise ValueError(f"invalid S3 URI {uri!r}: expected s3://bucket/prefix")
            return cls(_S3Backend(bucket, _check_rel(prefix.strip("/"), allow_root=True), endpoint_url))
        if "://" in uri:
            raise ValueError(f"unsupported run directory URI {uri!r}: use a local path or s3://bucket/prefix")
        return cls(_LocalBackend(Path(uri).expanduser().absolute()))

    @property
    def uri(self) -> str:
        """The run root: an absolute local path or ``s3://bucket/prefix``."""
        return self._b.uri()

    def _artifact(self, rel: str) -> str:
        rel = _check_rel(rel)
        if rel == MANIFEST or rel.split("/")[0] == DONE_DIR:
            raise ValueError(f"invalid run-relative path {rel!r}: reserved for the run directory's bookkeeping")
        return rel

    def _record(self, entries: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            self._manifest.update(entries)
            self._b.put_bytes(MANIFEST, json.dumps(self._manifest, indent=2, sort_keys=True).encode() + b"\n")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically write ``data`` to ``rel`` and record it in the manifest."""
        rel, data = self._artifact(rel), bytes(data)
        self._b.put_bytes(rel, data)
        self._record({rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}})

    def write_text(self, rel: str, text: str) -> None:
        """Write UTF-8 text."""
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        """Write one JSON document (indented, UTF-8)."""
        self.write_text(rel, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def write_jsonl(self, rel: str, rows: Iterable[Any]) -> None:
        """Write one JSON object per line."""
        self.write_text(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def read_bytes(self, rel: str) -> bytes:
        """Read a file; FileNotFoundError (naming its URI) if it is missing."""
        return self._b.get_bytes(_check_rel(rel))

    def read_text(self, rel: str) -> str:
        """Read UTF-8 text."""
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        """Read one JSON document."""
        return json.loads(self.read_bytes(rel))

    def read_jsonl(self, rel: str) -> list[Any]:
        """Read a JSON-lines file (blank lines are skipped)."""
        return [json.loads(line) for line in self.read_text(rel).splitlines() if line.strip()]

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` is an existing file (not a directory)."""
        return self._b.exists(_check_rel(rel))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative paths of all files under the directory ``prefix`` ("" = the whole run)."""
        return sorted(self._b.list(_check_rel(prefix, allow_root=True)))

    def upload_dir(self, local_dir: str | os.PathLike[str], rel: str) -> list[str]:
        """Copy every file under ``local_dir`` to ``rel/...``; all are recorded in one manifest update."""
        src = Path(local_dir)
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: not a directory")
        rel = _check_rel(rel, allow_root=True)
        # Validate every destination before uploading anything, so a bad name leaves nothing behind.
        files = {self._artifact(f"{rel}/{p.relative_to(src).as_posix()}".lstrip("/")): p
                 for p in sorted(src.rglob("*")) if p.is_file()}
        entries: dict[str, dict[str, Any]] = {}
        for dst, path in files.items():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            self._b.put_file(dst, path)
            entries[dst] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
        self._record(entries)
        return sorted(entries)

    def download_dir(self, rel: str, local_dir: str | os.PathLike[str]) -> list[Path]:
        """Copy every file under ``rel`` ("" = whole run) into ``local_dir``; each file lands atomically."""
        names = self.list(rel := _check_rel(rel, allow_root=True))
        if not names:
            raise FileNotFoundError(f"{self._b.uri(rel)}: no files under this prefix")
        out = [Path(local_dir, name[len(rel) + 1 if rel else 0:]) for name in names]
        for name, dst in zip(names, out):
            self._b.get_file(name, dst)
        return out

    def local_path(self, rel: str) -> Path | None:
        """The local filesystem path of ``rel`` for a local run directory; None on S3."""
        rel = _check_rel(rel, allow_root=True)
        return self._b.root / rel if isinstance(self._b, _LocalBackend) else None

    def manifest(self) -> dict[str, dict[str, Any]]:
        """A copy of the manifest: relative path -> {"sha256": hex, "bytes": size}."""
        with self._lock:
            return {k: dict(v) for k, v in self._manifest.items()}

    def _marker(self, stage: str) -> str:
        if not stage or "/" in stage or stage in (".", "..") or "\\" in stage:
            raise ValueError(f"invalid stage name {stage!r}: must be a single path component")
        return f"{DONE_DIR}/{stage}.json"

    def _root_prefix(self) -> str:
        return self.uri.rstrip("/") + "/"

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        """Write the stage's done marker; call it only after all of the stage's artifacts are written.

        A top-level string naming a path inside this run is stored relative to it (``{run}/rel``), so a run
        directory that was moved, cloned or copied still finds its own artifacts (``done_info`` expands it)."""
        root = self._root_prefix()
        info = {k: RUN_REF + v[len(root):] if isinstance(v, str) and v.startswith(root) else v
                for k, v in info.items()}
        self._b.put_bytes(self._marker(stage), (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode())

    def is_done(self, stage: str) -> bool:
        """Whether ``mark_done(stage, ...)`` has completed for this run."""
        return self._b.exists(self._marker(stage))

    def done_info(self, stage: str) -> dict[str, Any] | None:
        """The ``info`` given to ``mark_done``, or None if the stage is not done."""
        try:
            info = json.loads(self._b.get_bytes(self._marker(stage)))
        except FileNotFoundError:
            return None
        root = self._root_prefix()
        return {k: root + v[len(RUN_REF):] if isinstance(v, str) and v.startswith(RUN_REF) else v
                for k, v in info.items()}


def localize(uri: str, *, endpoint_url: str | None = None, cache: str | os.PathLike[str] | None = None,
             required: str | None = None) -> Path:
    """A local directory holding ``uri``'s files: the path itself when local, else a cached S3 download.

    Used by Ray workers (training, Tune trials, serving replicas), which may run on a node other than the
    driver's: they receive run-directory URIs and fetch what they read. Artifacts a run refers to by URI
    are written once and never rewritten, so the cache is keyed by the URI alone. ``required`` names a file
    that must be under the prefix (checked before anything is downloaded; FileNotFoundError otherwise).
    """
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: no such directory")
        return path
    root = Path(cache or os.environ.get("RR_RAY_CACHE") or Path.home() / ".cache" / "rr-ray").expanduser()
    target = root / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / ".complete").is_file():
        return target
    store = RunDir.open(uri, endpoint_url=endpoint_url)
    if required and not store.exists(required):
        raise FileNotFoundError(f"{uri}: no {required} under this prefix")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    store.download_dir("", tmp)
    (tmp / ".complete").write_text(uri)
    try:
        os.replace(tmp, target)
    except OSError:  # another worker finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def arrow_storage(uri: str, endpoint_url: str | None = None) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train / Tune: a local directory or an S3 prefix."""
    if uri.startswith("s3://"):
        import pyarrow.fs

        fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint_url) if endpoint_url else pyarrow.fs.S3FileSystem()
        return uri.removeprefix("s3://"), fs
    Path(uri).mkdir(parents=True, exist_ok=True)
    return str(Path(uri).resolve()), None
