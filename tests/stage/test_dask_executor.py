"""ingest and shard through Dask (executor: dask) on a real 2-worker LocalCluster: byte-identical to the local
process pool, a worker SIGKILLed mid-ingest loses and duplicates nothing, a chunk that raised is retried and
yielded once, and a scheduler that is not there (or dask not installed) is a ConfigError naming the key."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks import ingest, shard, split
from tasks.core import io
from tasks.core.config import IngestConfig, ShardConfig, SplitConfig
from tasks.core.errors import ConfigError
from tasks.core.parallel import ExecutorSpec, bounded_map
from tests.conftest import encode, pattern, tmp_paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A real 2-worker LocalCluster (one process and thread each, restarted by its nanny if killed). distributed is
    a dependency (requirements.lock): where it is missing these tests fail, they do not skip."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      scheduler_port=_free_port(), dashboard_address=None) as c:
        yield c


def _digests(folder: str) -> dict[str, str]:
    root = Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_ingest_split_shard_through_dask_match_the_local_pool(cluster, tmp_path):
    local, remote = tmp_paths(tmp_path / "local"), tmp_paths(tmp_path / "dask")
    dask_kw = {"workers": 2, "executor": "dask", "scheduler_address": cluster.scheduler_address}
    for p, kw in ((local, {"workers": 2}), (remote, dask_kw)):
        ingest.run(IngestConfig(**kw), p)
        split.run(SplitConfig(), p)
        shard.run(ShardConfig(**kw), p)

    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as c:  # both stages' chunks ran on this cluster
        ran = c.run_on_scheduler(lambda dask_scheduler: {p.name: sum(p.state_counts.values())
                                                         for p in dask_scheduler.task_prefixes.values()})
    assert ran.get("process_chunk", 0) >= 1797 // 64 and ran.get("decode_batch", 0) >= 1797 // 256, ran

    ids = pq.read_table(local.raw_items, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 1797
    assert pq.read_table(remote.raw_items).equals(pq.read_table(local.raw_items))
    assert _digests(remote.raw_items) == _digests(local.raw_items)  # same parts, byte for byte
    assert pq.read_table(remote.rejects).equals(pq.read_table(local.rejects))
    assert io.sha256_file(remote.split_manifest) == io.sha256_file(local.split_manifest)
    shards = _digests(local.shards_dir)
    assert "index.json" in shards and sum(f.endswith(".parquet") for f in shards) >= 3
    assert _digests(remote.shards_dir) == shards  # every shard file and the index (rows, checksums, stats)


def _image_folder(root: Path, n: int) -> int:
    """``n`` distinct small PNGs in two class folders, plus two files ingest must reject; returns n."""
    for k in range(n):
        d = root / ("a" if k % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{k:05d}.png").write_bytes(encode(pattern(10_000 + k, size=32)))
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "notes.jpg").write_bytes(b"not an image")
    return n


def test_a_worker_killed_mid_ingest_loses_and_duplicates_nothing(cluster, tmp_path):
    n = _image_folder(tmp_path / "images", 3000)
    src = str(tmp_path / "images")
    local, remote = tmp_paths(tmp_path / "local"), tmp_paths(tmp_path / "dask")
    ingest.run(IngestConfig(source=src, workers=2), local)

    killed: list[tuple[str, int, int]] = []  # (worker address, pid, tasks it was processing)
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as watcher:
        pids = watcher.run(os.getpid)
        assert len(pids) == 2
        stop = threading.Event()

        def kill_one_busy_worker() -> None:  # SIGKILL a worker process while it holds an ingest chunk
            while not stop.is_set():
                busy = {w: len(keys) for w, keys in watcher.processing().items() if keys and w in pids}
                if busy:
                    w = next(iter(busy))
                    os.kill(pids[w], signal.SIGKILL)
                    killed.append((w, pids[w], busy[w]))
                    return
                time.sleep(0.002)

        killer = threading.Thread(target=kill_one_busy_worker, daemon=True)
        killer.start()
        try:
            r = ingest.run(IngestConfig(source=src, workers=2, executor="dask",
                                        scheduler_address=cluster.scheduler_address), remote)
        finally:
            stop.set()
            killer.join(10)
        assert killed, "no worker was seen processing an ingest chunk, so none was killed"
        address, pid, _ = killed[0]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # that worker process really died during the run
        assert address not in watcher.run(os.getpid)  # the scheduler dropped it (its nanny started a new one)

    assert (r.found, r.ingested, r.rejected) == (n + 2, n, 2)
    table = pq.read_table(remote.raw_items)
    ids = table.column("id").to_pylist()
    want = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "images").rglob("0*.png")}
    assert len(ids) == len(set(ids)) == n and set(ids) == want  # every item exactly once
    assert table.equals(pq.read_table(local.raw_items))
    assert _digests(remote.raw_items) == _digests(local.raw_items)
    assert pq.read_table(remote.rejects).equals(pq.read_table(local.rejects))


def _fails_first_time(item: tuple[str, int]) -> int:
    """Raises on the first attempt at every odd item (a marker file counts attempts across worker processes)."""
    folder, k = item
    marker = Path(folder) / f"{k}.attempts"
    attempts = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(attempts))
    if k % 2 and attempts == 1:
        raise RuntimeError(f"chunk {k}: first attempt fails")
    return k * k


def test_a_chunk_that_raised_is_retried_once_and_yielded_once_in_order(cluster, tmp_path):
    spec = ExecutorSpec("dask", cluster.scheduler_address, retries=1, section="ingest")
    items = [(str(tmp_path), k) for k in range(40)]
    assert list(bounded_map(_fails_first_time, items, 2, executor=spec)) == [k * k for k in range(40)]
    attempts = {k: int((tmp_path / f"{k}.attempts").read_text()) for k in range(40)}
    assert attempts == {k: 2 if k % 2 else 1 for k in range(40)}

    no_retry = ExecutorSpec("dask", cluster.scheduler_address, retries=0, section="ingest")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(RuntimeError, match="chunk 1: first attempt fails"):
        list(bounded_map(_fails_first_time, [(str(fresh), k) for k in range(4)], 2, executor=no_retry))


def _nothing_listens() -> str:
    return f"tcp://127.0.0.1:{_free_port()}"


def test_no_scheduler_at_the_address_is_a_config_error_naming_the_key(paths):
    import dask
    import distributed  # noqa: F401 - its config defaults first: dask.config.set would drop them on exit otherwise

    address = _nothing_listens()
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), pytest.raises(ConfigError) as err:
        ingest.run(IngestConfig(executor="dask", scheduler_address=address), paths)
    msg = str(err.value)
    assert msg.startswith("ingest.executor: dask: no Dask scheduler answered at ")
    assert address in msg and "given by ingest.scheduler_address" in msg and "ingest.executor: local" in msg
    assert not Path(paths.raw_items).exists()  # nothing that looks finished


def test_scheduler_from_the_environment_is_named_when_it_is_not_there(paths, monkeypatch):
    import dask
    import distributed  # noqa: F401 - see above

    address = _nothing_listens()
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    unset = r"given by \$DASK_SCHEDULER_ADDRESS \(ingest.scheduler_address is unset\)"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), pytest.raises(ConfigError, match=unset):
        ingest.run(IngestConfig(executor="dask"), paths)


@pytest.mark.parametrize("address", ["http://127.0.0.1:8786", "127.0.0.1"])
def test_a_malformed_scheduler_address_is_a_config_error(paths, address):
    with pytest.raises(ConfigError, match=r"ingest.executor: dask: .*given by ingest.scheduler_address, is not a "
                                          r"Dask scheduler address .*write it as tcp://HOST:PORT"):
        ingest.run(IngestConfig(executor="dask", scheduler_address=address), paths)


def test_dask_not_installed_is_a_config_error(paths, monkeypatch):
    import distributed  # noqa: F401 - imported whole first, so hiding it below leaves no half-imported state behind

    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` meets where it is absent
    with pytest.raises(ConfigError, match=r"ingest.executor: dask needs the packages dask and distributed.*"
                                          r"set ingest.executor: local"):
        ingest.run(IngestConfig(executor="dask"), paths)
