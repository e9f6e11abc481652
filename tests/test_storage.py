"""RunDir on local disk and on a real (moto) S3 endpoint: same tests for both backends."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from rr_ray.storage import RunDir, StorageError
from tests.conftest_s3 import S3_BUCKET  # fixtures s3_server and s3_uri come from tests/conftest.py


@pytest.fixture(params=["local", "s3"])
def rd(request: pytest.FixtureRequest, tmp_path: Path) -> RunDir:
    """A fresh, empty run directory on each backend (moto starts only when an s3 case runs)."""
    if request.param == "local":
        return RunDir.open(str(tmp_path / "run"))
    endpoint = request.getfixturevalue("s3_server")
    return RunDir.open(request.getfixturevalue("s3_uri"), endpoint_url=endpoint)


def test_roundtrip(rd: RunDir) -> None:
    blob = bytes(range(256)) * 17
    rd.write_bytes("a/blob.bin", blob)
    rd.write_text("notes.txt", "héllo\nwörld ✓\n")
    rd.write_json("cfg/run.json", {"seed": 3, "names": ["α", "b"], "nested": {"x": 1.5}})
    rows = [{"i": i, "text": f"row {i} ü"} for i in range(50)]
    rd.write_jsonl("data/rows.jsonl", rows)

    assert rd.read_bytes("a/blob.bin") == blob
    assert rd.read_text("notes.txt") == "héllo\nwörld ✓\n"
    assert rd.read_json("cfg/run.json") == {"seed": 3, "names": ["α", "b"], "nested": {"x": 1.5}}
    assert rd.read_jsonl("data/rows.jsonl") == rows
    rd.write_jsonl("data/empty.jsonl", [])
    assert rd.read_jsonl("data/empty.jsonl") == []
    rd.write_bytes("a/blob.bin", b"v2")  # overwrite
    assert rd.read_bytes("a/blob.bin") == b"v2"


def test_list_and_exists(rd: RunDir) -> None:
    for rel in ["a/x.txt", "a/sub/y.txt", "ab/z.txt", "top.txt"]:
        rd.write_text(rel, rel)
    assert rd.list() == ["a/sub/y.txt", "a/x.txt", "ab/z.txt", "manifest.json", "top.txt"]
    assert rd.list("a") == ["a/sub/y.txt", "a/x.txt"]  # a directory, not a string prefix: no "ab/"
    assert rd.list("a/") == ["a/sub/y.txt", "a/x.txt"]
    assert rd.list("a/sub") == ["a/sub/y.txt"]
    assert rd.list("missing") == []
    assert rd.exists("a/x.txt") and rd.exists("top.txt")
    assert not rd.exists("a")  # a directory is not a file
    assert not rd.exists("a/nope.txt")


def test_manifest_records_sha256_and_size(rd: RunDir) -> None:
    contents = {"one.bin": os.urandom(1000), "d/two.txt": "zwei".encode(), "d/e/three.json": b"{}"}
    for rel, data in contents.items():
        rd.write_bytes(rel, data)
    expected = {rel: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for rel, d in contents.items()}
    assert rd.manifest() == expected
    assert json.loads(rd.read_bytes("manifest.json")) == expected  # persisted, not only in memory

    rd.write_bytes("one.bin", b"new")
    assert rd.manifest()["one.bin"] == {"sha256": hashlib.sha256(b"new").hexdigest(), "bytes": 3}
    reopened = _reopen(rd)
    assert reopened.manifest() == rd.manifest()
    reopened.write_text("later.txt", "x")  # entries loaded on open are kept
    assert set(reopened.manifest()) == {"one.bin", "d/two.txt", "d/e/three.json", "later.txt"}


def test_markers(rd: RunDir) -> None:
    assert not rd.is_done("generate")
    assert rd.done_info("generate") is None
    rd.write_jsonl("generate/out.jsonl", [{"k": 1}])
    rd.mark_done("generate", {"rows": 1, "model": "tiny"})
    assert rd.is_done("generate")
    assert rd.done_info("generate") == {"rows": 1, "model": "tiny"}
    assert not rd.is_done("train")
    assert "_done/generate.json" in rd.list()
    assert not any(k.startswith("_done/") for k in rd.manifest())  # markers are not artifacts
    assert _reopen(rd).done_info("generate") == {"rows": 1, "model": "tiny"}
    for bad in ["", "a/b", "..", "x\\y"]:
        with pytest.raises(ValueError, match="invalid stage name"):
            rd.mark_done(bad, {})


def test_marker_paths_follow_a_moved_run(tmp_path: Path) -> None:
    import shutil

    rd = RunDir.open(str(tmp_path / "a"))
    rd.write_text("release/composed/x.txt", "w")
    rd.mark_done("release", {"composed_adapter": rd.uri + "/release/composed", "model": "/elsewhere/m"})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = RunDir.open(str(tmp_path / "b")).done_info("release")
    assert moved == {"composed_adapter": str(tmp_path / "b" / "release" / "composed"), "model": "/elsewhere/m"}
    assert rd.done_info("release")["composed_adapter"] == str(tmp_path / "a" / "release" / "composed")


def test_upload_download_dir_roundtrip(rd: RunDir, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = {"config.json": b'{"a": 1}', "weights/model.safetensors": os.urandom(300_000),
             "weights/deep/er/tok.txt": "tök".encode(), "empty": b""}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)

    written = rd.upload_dir(src, "models/m")
    assert written == sorted(f"models/m/{rel}" for rel in files)
    manifest = rd.manifest()
    for rel, data in files.items():
        assert manifest[f"models/m/{rel}"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    dst = tmp_path / "dst"
    got = rd.download_dir("models/m", dst)
    assert sorted(p.relative_to(dst).as_posix() for p in got) == sorted(files)
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data
    assert not [p for p in dst.rglob("*") if p.is_file() and p.relative_to(dst).as_posix() not in files]

    whole = tmp_path / "whole"
    rd.download_dir("", whole)
    assert (whole / "models/m/config.json").read_bytes() == files["config.json"]
    assert json.loads((whole / "manifest.json").read_text()) == manifest
    with pytest.raises(FileNotFoundError, match="no files under"):
        rd.download_dir("models/none", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        rd.upload_dir(tmp_path / "absent", "x")


BAD_PATHS = ["/etc/passwd", "../escape.txt", "a/../../b", "a/../b", "a//b", "./a", "", "a\\b", ".."]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_path_validation(rd: RunDir, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid run-relative path"):
        rd.write_bytes(bad, b"x")
    with pytest.raises(ValueError, match="invalid run-relative path"):
        rd.read_bytes(bad)
    with pytest.raises(ValueError, match="invalid run-relative path"):
        rd.exists(bad)
    if bad:  # "" means the whole run for list/download_dir
        with pytest.raises(ValueError, match="invalid run-relative path"):
            rd.list(bad)
    assert rd.manifest() == {}


def test_reserved_paths_rejected(rd: RunDir, tmp_path: Path) -> None:
    for rel in ["manifest.json", "_done/x.json", "_done/sub/y"]:
        with pytest.raises(ValueError, match="reserved"):
            rd.write_bytes(rel, b"x")
    (tmp_path / "up" / "_done").mkdir(parents=True)
    (tmp_path / "up" / "_done" / "fake.json").write_text("{}")
    (tmp_path / "up" / "0.txt").write_text("sorts before _done/, so a check-as-you-go upload would send it")
    with pytest.raises(ValueError, match="reserved"):
        rd.upload_dir(tmp_path / "up", "")
    assert not rd.is_done("fake")
    assert rd.list() == [] and rd.manifest() == {}  # nothing uploaded


def test_missing_key(rd: RunDir) -> None:
    with pytest.raises(FileNotFoundError) as info:
        rd.read_bytes("nope/missing.json")
    assert rd.uri + "/nope/missing.json" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        rd.read_json("missing.json")
    rd.write_text("d/f.txt", "x")
    with pytest.raises(FileNotFoundError):
        rd.read_bytes("d")  # a directory / bare prefix is not a file


def test_local_path(rd: RunDir) -> None:
    rd.write_text("x/y.txt", "hi")
    path = rd.local_path("x/y.txt")
    if rd.uri.startswith("s3://"):
        assert path is None
    else:
        assert path is not None and path.read_text() == "hi"
        assert str(path) == rd.uri + "/x/y.txt"


def _reopen(rd: RunDir) -> RunDir:
    return RunDir.open(rd.uri, endpoint_url=getattr(rd._b, "endpoint_url", None))


# ---- local only ----


def test_open_local_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet"
    rd = RunDir.open(str(target))
    assert rd.uri == str(target)
    assert not target.exists() and not (tmp_path / "not").exists()
    assert rd.list() == [] and not rd.exists("a.txt") and not rd.is_done("s") and rd.manifest() == {}
    assert not target.exists()
    rd.write_text("a.txt", "x")
    assert (target / "a.txt").read_text() == "x"


def test_open_relative_local_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rd = RunDir.open("runs/r1")
    assert rd.uri == str(tmp_path / "runs" / "r1")
    with pytest.raises(ValueError, match="unsupported run directory URI"):
        RunDir.open("gs://bucket/x")


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    rd = RunDir.open(str(tmp_path / "run"))
    size = 4 * 1024 * 1024
    versions = [bytes([i]) * size for i in range(1, 25)]
    known = {hashlib.sha256(v).hexdigest() for v in versions}
    rd.write_bytes("big.bin", versions[0])
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(2):
                for v in versions[1:]:
                    rd.write_bytes("big.bin", v)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads, seen = 0, set()
    while not done.is_set() or reads < 5:
        digest = hashlib.sha256(rd.read_bytes("big.bin")).hexdigest()
        assert digest in known, f"read {reads} saw a partial/mixed file"
        seen.add(digest)
        reads += 1
    thread.join()
    assert not errors, errors
    assert len(seen) > 1, "reader never overlapped the writer; the test proved nothing"
    assert sorted(os.listdir(tmp_path / "run")) == ["big.bin", "manifest.json"]  # no temp files left
    assert rd.manifest()["big.bin"]["sha256"] == hashlib.sha256(versions[-1]).hexdigest()


def test_local_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    rd = RunDir.open(str(tmp_path / "run"))
    rd.write_text("keep.txt", "old")

    def fail_midway(f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rd._b._atomic(tmp_path / "run" / "keep.txt", fail_midway)
    with pytest.raises(TypeError):
        rd.write_json("keep.txt", {"x": object()})  # not serialisable: nothing is written
    assert rd.read_text("keep.txt") == "old"
    assert sorted(os.listdir(tmp_path / "run")) == ["keep.txt", "manifest.json"]


def test_local_files_get_umask_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        rd = RunDir.open(str(tmp_path / "run"))
        rd.write_text("a.txt", "x")
        rd.mark_done("s", {})
    finally:
        os.umask(umask)
    for rel in ["a.txt", "manifest.json", "_done/s.json"]:
        assert stat.S_IMODE(os.stat(tmp_path / "run" / rel).st_mode) == 0o644, rel  # not mkstemp's 0o600


# ---- S3 only ----


def test_s3_missing_bucket(s3_server: str) -> None:
    with pytest.raises(FileNotFoundError, match="'no-such-bucket-x'"):
        RunDir.open("s3://no-such-bucket-x/run", endpoint_url=s3_server)


def test_s3_unreachable_endpoint_is_one_line(s3_server: str) -> None:
    from tests.procs import free_port

    with pytest.raises(StorageError) as info:
        RunDir.open(f"s3://{S3_BUCKET}/x", endpoint_url=f"http://127.0.0.1:{free_port()}")
    assert f"s3://{S3_BUCKET}/x" in str(info.value) and "\n" not in str(info.value)


def test_s3_endpoint_from_env(s3_server: str, s3_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    RunDir.open(s3_uri, endpoint_url=s3_server).write_text("hello.txt", "via argument")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    rd = RunDir.open(s3_uri)  # no endpoint_url: boto3 reads the standard env var
    assert rd.read_text("hello.txt") == "via argument"


def test_s3_uri_forms(s3_server: str) -> None:
    root = RunDir.open(f"s3://{S3_BUCKET}", endpoint_url=s3_server)
    assert root.uri == f"s3://{S3_BUCKET}"
    sub = RunDir.open(f"s3://{S3_BUCKET}/forms/x/", endpoint_url=s3_server)
    assert sub.uri == f"s3://{S3_BUCKET}/forms/x"
    sub.write_text("f.txt", "1")
    assert "forms/x/f.txt" in root.list("forms")
    for bad in ["s3://", "s3:///prefix", f"s3://{S3_BUCKET}/a/../b"]:
        with pytest.raises(ValueError):
            RunDir.open(bad, endpoint_url=s3_server)
