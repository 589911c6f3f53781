"""An uploaded epoch is written once: streamed into a temp file in the run's folder, that
file validated and renamed into place (``RunStore.receive_epoch``), never copied.

The bytes this process writes are counted by the kernel (``wchar`` of ``/proc/self/io``,
Linux): a PUT of an N-byte file writes about N bytes, where the earlier upload path (a
temp file in ``uploads/``, then a copy into the run's folder) wrote 2N. The copy
functions are made to fail, so that any copy would show. Refusals, retries and conflicts
leave no temp file behind; a writer killed midway leaves its temp file in the run's folder,
which recovery (``fsck``, or the next write to the run) removes.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import REPO, ClientFactory, TestClient
from tests.trainer.conftest import _snapshot
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStore, write_epoch_file
from trainer.store.runstore import EpochUpload

H5 = {"Content-Type": "application/x-hdf5"}
BIG = {"layer1": (600, 400), "layer2": (10, 600)}  # ~ 240k weights: a file of several MB
PROC_IO = Path("/proc/self/io")


@pytest.fixture
def catalog_url() -> str | None:
    """SQLite only (overrides the conftest's two catalogs): nothing here is the catalog's."""
    return None


@pytest.fixture(autouse=True)
def no_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any copy of a file (shutil's, or the kernel's sendfile that shutil uses) fails."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("an epoch file was copied")

    for name in ("copyfile", "copy", "copy2", "copyfileobj"):
        monkeypatch.setattr(shutil, name, refuse)
    monkeypatch.setattr("os.sendfile", refuse, raising=False)


def _file(path: Path, epoch: int, seed: int = 0, layers: dict[str, Any] | None = None) -> Path:
    write_epoch_file(path, _snapshot(epoch, layers=layers or BIG, seed=seed), run_id="")
    return path


def _written() -> int:
    for line in PROC_IO.read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def _temp_files(data: Path) -> list[Path]:
    return [p for p in data.rglob("*.tmp.*") if p.is_file()]


@pytest.fixture
def big_run(client: TestClient) -> str:
    """A run whose configuration pins no layout (its first epoch does)."""
    store: RunStore = client.app.state.store  # type: ignore[attr-defined]
    return store.create_run("big", {}).id


@pytest.mark.skipif(not PROC_IO.exists(), reason="needs /proc/self/io (Linux)")
def test_a_put_writes_the_file_once(client: TestClient, big_run: str, tmp_path: Path) -> None:
    path = _file(tmp_path / "e0.h5", 0)
    body = path.read_bytes()
    size = len(body)
    assert size > 2_000_000
    before = _written()
    response = client.put(f"/runs/{big_run}/epochs/0", content=body, headers=H5)
    written = _written() - before
    assert response.status_code == 201, response.text
    # the file once, plus the catalog's few pages; a copy would make it 2x
    assert size <= written < 1.25 * size
    stored = tmp_path / "data0" / "runs" / big_run / "epoch_000000.h5"
    assert stored.read_bytes() == body
    assert response.json()["checksum"] == hashlib.sha256(body).hexdigest()
    assert response.json()["size"] == size
    before = _written()  # a retry of the same bytes: written to a temp file, then dropped
    again = client.put(f"/runs/{big_run}/epochs/0", content=body, headers=H5)
    assert again.status_code == 200 and again.json() == response.json()
    assert _written() - before < 1.25 * size
    assert not _temp_files(tmp_path / "data0")


def test_the_upload_is_received_in_the_runs_folder(
    client: TestClient, big_run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    commit = EpochUpload.commit

    def spy(self: EpochUpload, **kwargs: Any) -> Any:
        seen.append(self.path)
        assert self.path.stat().st_size == self.size  # all of it written before the check
        return commit(self, **kwargs)

    monkeypatch.setattr(EpochUpload, "commit", spy)
    body = _file(tmp_path / "e0.h5", 0).read_bytes()
    assert client.put(f"/runs/{big_run}/epochs/0", content=body, headers=H5).status_code == 201
    (path,) = seen
    assert path.parent == tmp_path / "data0" / "runs" / big_run
    assert path.name.startswith("epoch_000000.h5.tmp.")
    assert not path.exists()  # renamed into place
    assert not (tmp_path / "data0" / "uploads").exists()  # no staging folder any more


def test_refused_and_conflicting_uploads_leave_nothing_behind(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    client = make_client(max_upload_bytes=3_000_000)
    store: RunStore = client.app.state.store  # type: ignore[attr-defined]
    run = store.create_run("big", {}).id
    data = tmp_path / "data0"
    first = _file(tmp_path / "e0.h5", 0, layers={"layer1": (40, 30)}).read_bytes()
    assert client.put(f"/runs/{run}/epochs/0", content=first, headers=H5).status_code == 201
    other = _file(tmp_path / "e0b.h5", 0, seed=1, layers={"layer1": (40, 30)}).read_bytes()
    conflict = client.put(f"/runs/{run}/epochs/0", content=other, headers=H5)
    assert conflict.status_code == 409, conflict.text
    assert (data / "runs" / run / "epoch_000000.h5").read_bytes() == first
    wrong = client.put(f"/runs/{run}/epochs/1", content=b"not hdf5" * 100, headers=H5)
    assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "corrupt"
    big = _file(tmp_path / "big.h5", 1).read_bytes()
    assert len(big) > 3_000_000

    def chunks() -> Any:  # no Content-Length: refused while streaming, part written
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    too_large = client.put(f"/runs/{run}/epochs/1", content=chunks(), headers=H5)
    assert too_large.status_code == 413
    assert [e["epoch"] for e in client.get(f"/runs/{run}/epochs").json()] == [0]
    assert not _temp_files(data)
    assert sorted(p.name for p in (data / "runs" / run).iterdir()) == [
        ".lock",
        "epoch_000000.h5",
    ]


def test_receive_epoch_in_the_store(tmp_path: Path) -> None:
    source = _file(tmp_path / "e3.h5", 3, layers={"layer1": (8, 4)})
    body = source.read_bytes()
    with RunStore(tmp_path / "data") as store:
        run = store.create_run("r", {}).id
        with store.receive_epoch(run, 3) as upload:
            for start in range(0, len(body), 1000):
                upload.write(body[start : start + 1000])
            assert upload.size == len(body)
            assert upload.checksum == hashlib.sha256(body).hexdigest()
            info = upload.commit()
            with pytest.raises(RuntimeError, match="committed"):
                upload.write(b"more")
        assert info.checksum == upload.checksum and info.size == len(body)
        assert store.epoch_path(run, 3).read_bytes() == body
        assert store.import_epoch_file(run, 3, source) == info  # no shutil.copyfile needed
        with store.receive_epoch(run, 4) as upload:  # abandoned: nothing stays
            upload.write(body)
            temp = upload.path
            assert temp.exists()
        assert not temp.exists()
        with store.receive_epoch(run, 4) as upload:
            upload.write(body)
            with pytest.raises(BnnError) as err:
                upload.commit()  # the file says epoch 3
        assert err.value.code is ErrorCode.INVALID_ARGUMENT and "epoch 3" in err.value.message
        assert [e.epoch for e in store.list_epochs(run)] == [3]
        assert not _temp_files(tmp_path / "data")
        with pytest.raises(BnnError) as missing:
            store.receive_epoch("nobody", 0)
        assert missing.value.code is ErrorCode.NOT_FOUND


def test_an_upload_killed_midway_leaves_only_a_temp_file_that_recovery_removes(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with RunStore(data) as store:
        run = store.create_run("r", {}).id
    body = _file(tmp_path / "e0.h5", 0, layers={"layer1": (8, 4)}).read_bytes()
    half = tmp_path / "half.bin"
    half.write_bytes(body[: len(body) // 2])
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from trainer.store import RunStore\n"
        "store = RunStore(sys.argv[1])\n"
        "upload = store.receive_epoch(sys.argv[2], 0)\n"
        "upload.write(Path(sys.argv[3]).read_bytes())\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(data), run, str(half)], cwd=REPO, check=False
    )
    assert done.returncode == -signal.SIGKILL
    (left,) = _temp_files(data)  # the killed writer's, in the run's folder
    assert left.parent == data / "runs" / run and left.stat().st_size == len(body) // 2
    with RunStore(data) as store:
        assert store.list_epochs(run) == []
        report = store.fsck(repair=True, verify=False)
        assert any(f.done for f in report.findings)
        assert not _temp_files(data)
        with store.receive_epoch(run, 0) as upload:  # the epoch can be uploaded again
            upload.write(body)
            assert upload.commit().size == len(body)
