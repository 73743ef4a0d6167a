"""A pod on one machine, end to end: a token-store run on 4 hosts x 2 devices (a real slice's
device order: every host's batch rows spread over the batch) is preempted after a checkpoint,
resumes on 2 hosts x 4 devices on the same workdir (a local one, or gs:// on the emulator), and
ends at the losses of a one-process run on the same data; nothing is set aside."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from gcs_emulator import child_env

from mmjax.data import stories
from mmjax.train import storage

REPO = pathlib.Path(__file__).resolve().parent.parent
POD = [sys.executable, str(REPO / "launch" / "local_pod.py")]
STEPS = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path, tok = stories.make_story_store(tmp_path_factory.mktemp("pod_text"), 400, seed=5)
    return path, tok.vocab_size


def train_flags(store, workdir):
    path, vocab = store
    return ["--config", "configs/mm_v1_small.py:tiny_text", f"--config.data.path={path}",
            f"--config.model.vocab_size={vocab}", "--config.model.num_layers=1",
            "--config.model.embed_dim=32", "--config.model.pmem_size=32",
            "--config.data.context_length=32", "--config.data.batch_size=16",
            "--config.optimizer.warmup_steps=2", f"--config.optimizer.total_steps={STEPS}",
            f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.eval_batches=1",
            "--config.checkpoint.save_every=2", "--workdir", str(workdir)]


def losses(workdir):
    rows = [json.loads(line) for line in
            storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def one_process(store, tmp_path_factory):
    """The losses of the same run in one process (8 devices)."""
    workdir = tmp_path_factory.mktemp("single") / "run"
    single = subprocess.run([sys.executable, "-m", "mmjax.train", *train_flags(store, workdir)],
                            cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True,
                            capture_output=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    return losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gs"])
def test_preempted_on_4_hosts_resumed_on_2_equals_one_process(store, one_process, tmp_path,
                                                               where, request):
    if where == "gs":
        env, workdir = child_env(request.getfixturevalue("emulator")), \
            f"{request.getfixturevalue('gcs')}/pod"
    else:
        env, workdir = dict(os.environ, PYTHONUNBUFFERED="1"), str(tmp_path / "pod")
    first = subprocess.Popen(
        [*POD, "--processes=4", "--devices_per_process=2", f"--log_dir={tmp_path / 'logs1'}",
         "--", *train_flags(store, workdir)], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    try:
        for line in first.stdout:
            seen.append(line)
            if line.startswith("step 3:"):  # after the checkpoint of step 2
                first.send_signal(signal.SIGTERM)
                break
        seen.extend(first.stdout)
        assert first.wait(timeout=300) == 3, "".join(seen)[-3000:]
    finally:
        first.kill()
        first.wait()
    # a real slice's device order: host 0's rows are spread over the batch (4 hosts, 16 rows)
    assert "4 hosts; host 0 reads batch rows 0-1, 4-5 of 16" in "".join(seen)
    saved = sorted(int(name) for name in storage.listdir(f"{workdir}/checkpoints")
                   if name.isdigit())
    assert saved and saved[-1] < STEPS, saved
    second = subprocess.run(
        [*POD, "--processes=2", "--devices_per_process=4", f"--log_dir={tmp_path / 'logs2'}",
         "--", *train_flags(store, workdir)], cwd=REPO, env=env, text=True,
        capture_output=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"at step {saved[-1]}" in second.stdout
    assert "2 hosts; host 0 reads batch rows 0-3, 8-11 of 16" in second.stdout
    assert not storage.exists(f"{workdir}/corrupt_checkpoints")
    pod = losses(workdir)
    assert sorted(pod) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # the same batches, in the same order
        assert pod[step] == pytest.approx(one_process[step], rel=1e-5), step
