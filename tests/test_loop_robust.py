"""A loop that never loses work: NaN guard, config validation, workdir lock, corrupt
checkpoints, config changes at resume, preemption, kill -9 at random moments, clean logs.

In-process tests use ``test_train.small_config``; CLI tests run ``python -m mmjax.train`` on
the same tiny model through ``--config.*`` overrides.
"""

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from config_loading import TINY
from test_train import small_config

from mmjax.cli import EXIT_PREEMPTED
from mmjax.config import validate_config, with_defaults
from mmjax.train.checkpoint import Checkpointer, WorkdirLock, damage
from mmjax.train.loop import (
    NonFiniteLossError,
    Reporter,
    Trainer,
    train_and_evaluate,
)
from mmjax.train.metrics import MetricWriter

REPO = pathlib.Path(__file__).resolve().parent.parent


def leaves(tree):
    return jax.tree.leaves(jax.device_get(tree))


def strict_rows(path):
    """metrics.jsonl parsed as strict JSON (a bare NaN or Infinity fails)."""
    def reject(name):
        raise ValueError(f"non-JSON constant {name}")
    return [json.loads(line, parse_constant=reject)
            for line in pathlib.Path(path).read_text().splitlines()]


def saved_params(workdir, step=None):
    """The parameters of a workdir's checkpoint (the latest by default), as numpy."""
    import orbax.checkpoint as ocp
    directory = pathlib.Path(workdir) / "checkpoints"
    step = step if step is not None else max(int(p.name) for p in directory.iterdir()
                                              if p.name.isdigit())
    tree = ocp.PyTreeCheckpointer().restore(directory / str(step) / "state")
    return jax.tree.leaves(tree["params"])


# ---------------------------------------------------------------------------- NaN guard


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config(num_steps=30)
    config.optimizer.learning_rate = 1e6
    config.checkpoint.save_every = 2
    with pytest.raises(NonFiniteLossError, match=r"step \d+: non-finite") as info:
        train_and_evaluate(config, str(tmp_path), progress=False)
    bad_step = int(str(info.value).split(":")[0].split()[1])
    assert bad_step < 30
    assert "last good checkpoint" in str(info.value)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert steps and max(steps) < bad_step
    for step in steps:
        assert all(np.isfinite(x).all() for x in saved_params(tmp_path, step))
    strict_rows(tmp_path / "metrics.jsonl")  # valid JSON, no bare NaN
    assert not (tmp_path / "lock").exists()  # released on the way out


def test_nan_learning_rate_stops_at_step_one_without_any_checkpoint(tmp_path):
    config = small_config(num_steps=10)
    config.optimizer.learning_rate = float("nan")
    config.checkpoint.save_every = 1
    with pytest.raises(NonFiniteLossError, match="step 1: non-finite"):
        train_and_evaluate(config, str(tmp_path), progress=False)
    assert not any((tmp_path / "checkpoints").glob("[0-9]*"))


def test_skip_nonfinite_steps_leaves_the_state_and_counts(tmp_path):
    config = small_config(num_steps=4)
    config.optimizer.learning_rate = float("nan")
    config.train.update(skip_nonfinite_steps=True, log_every=1)
    out = train_and_evaluate(config, str(tmp_path), progress=False)
    assert out["skipped_steps"] == 4 and int(out["state"].step) == 4
    initial = Trainer(small_config(num_steps=4)).init_state()
    for a, b in zip(leaves(initial.params), leaves(out["state"].params)):
        np.testing.assert_array_equal(a, b)
    rows = [r for r in strict_rows(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3, 4]


def test_metrics_jsonl_writes_nan_as_null(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(3, {"loss": float("nan"), "grad_norm": float("inf"), "x": 1.5})
    writer.close()
    assert strict_rows(tmp_path / "metrics.jsonl") == [
        {"step": 3, "loss": None, "grad_norm": None, "x": 1.5}]


def test_out_of_vocabulary_ids_are_counted_and_named():
    trainer = Trainer(small_config())
    state = trainer.init_state()
    tokens = np.array(jax.device_get(trainer.batch(0)))
    tokens[0, -1] = 999  # vocab is 16 (a target only)
    tokens[1, 0] = -1  # -1 is an ignored target only, never an input
    batch = jax.make_array_from_callback(tokens.shape, trainer.batch_sharding,
                                         lambda i: tokens[i])
    _, metrics = trainer.train_step(state, batch)
    assert int(metrics["bad_token_ids"]) == 2

    class Sink:
        def write(self, *a):
            pass

        def set_postfix(self, **k):
            pass

    reporter = Reporter(Sink(), Sink(), log_every=1, tokens_per_step=1)
    reporter.record(7, dict(loss=np.float32("nan"), grad_norm=np.float32(1.0),
                            finite=False, bad_token_ids=2))
    with pytest.raises(NonFiniteLossError, match="step 7.*2 token ids outside the vocab"):
        reporter.flush()


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("key,value", [
    ("train.log_every", 0), ("train.eval_batches", 0), ("train.num_steps", -5),
    ("checkpoint.max_to_keep", 0), ("train.eval_every", -1), ("checkpoint.save_every", -1),
    ("data.context_length", 0), ("train.seed", -1), ("data.batch_size", 0),
    ("train.grad_accum_steps", 0)])
def test_bad_config_values_are_named_before_compiling(key, value, monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("compiled before validating")
    monkeypatch.setattr(Trainer, "_build_steps", no_compile)
    config = small_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=f"{key}={value}: must be"):
        Trainer(config)


def test_every_problem_gets_its_line():
    config = with_defaults(small_config())
    config.train.log_every = 0
    config.data.context_length = 0
    with pytest.raises(ValueError) as info:
        validate_config(config)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and "train.log_every" in lines[1] and "context_length" in lines[2]




def cli(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "mmjax.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_cli_unknown_key_and_bad_value_give_one_line():
    unknown = cli("--config.model.nonexistent=1")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "error: unknown config key in --config.model.nonexistent=1: 'nonexistent'"]
    bad = cli("--config.train.log_every=0", "--config.train.eval_batches=0")
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert "train.log_every=0: must be >= 1" in bad.stderr
    assert "train.eval_batches=0: must be >= 1" in bad.stderr


def test_cli_nonfinite_loss_exits_1_naming_the_step(tmp_path):
    run = cli(*TINY, "--config.optimizer.learning_rate=1e6", "--config.train.num_steps=40",
              "--config.checkpoint.save_every=2", "--workdir", str(tmp_path))
    assert run.returncode == 1
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("step ") and "non-finite training" in last, run.stdout[-2000:]
    assert "last good checkpoint (step" in last
    assert "Traceback" not in run.stderr
    strict_rows(tmp_path / "metrics.jsonl")


# ---------------------------------------------------------------------------- lock


def test_second_run_on_a_workdir_is_refused(tmp_path):
    held = WorkdirLock(tmp_path)
    held.acquire()
    with pytest.raises(RuntimeError, match=f"lock file {tmp_path / 'lock'} held by host "
                                           f"{socket.gethostname()} pid {os.getpid()}"):
        train_and_evaluate(small_config(num_steps=3), str(tmp_path), progress=False)
    assert (tmp_path / "lock").exists()  # the refused run leaves the holder's lock alone
    held.release()
    assert not (tmp_path / "lock").exists()
    train_and_evaluate(small_config(num_steps=3), str(tmp_path), progress=False)


def test_a_crashed_runs_lock_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "started": 0}))
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    assert f"taking over the stale lock {tmp_path / 'lock'}" in capsys.readouterr().err
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    lock.release()
    # another host's lock: alive while its heartbeat is fresh, stale after the timeout
    (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RuntimeError, match="held by host elsewhere pid 1"):
        WorkdirLock(tmp_path, stale_seconds=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / "lock", (old, old))
    WorkdirLock(tmp_path, stale_seconds=60).acquire()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = WorkdirLock(tmp_path, heartbeat_seconds=0)
    lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    lock.heartbeat()
    assert time.time() - lock.path.stat().st_mtime < 100


# ---------------------------------------------------------------------------- checkpoints


def largest_file(directory):
    """The largest array-data file of a checkpoint step (on a real model, its largest file;
    on these tiny ones the sharding metadata is larger, and orbax does not need it)."""
    return max((pathlib.Path(directory) / "state" / "d").iterdir(),
               key=lambda p: p.stat().st_size)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    config = small_config(num_steps=8)
    config.checkpoint.update(save_every=2, max_to_keep=5)
    straight = train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    config.train.num_steps = 6
    train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    victim = largest_file(tmp_path / "b" / "checkpoints" / "6")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    capsys.readouterr()
    config.train.num_steps = 8
    resumed = train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    out = capsys.readouterr()
    assert "checkpoint step 6 in" in out.err and "unreadable" in out.err
    assert "at step 4" in out.out
    assert [h["step"] for h in resumed["history"]] == [5, 6, 7, 8]
    logged = [r["step"] for r in strict_rows(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert logged[0] == 1 and logged == sorted(set(logged))
    for a, b in zip(leaves(straight["state"].params), leaves(resumed["state"].params)):
        np.testing.assert_array_equal(a, b)
    assert any((tmp_path / "b" / "corrupt_checkpoints").iterdir())


class FlakyRestore:
    """``CheckpointManager.restore`` failing ``failures`` times with ``error``, then reading."""

    def __init__(self, error, failures):
        self.error, self.failures, self.calls = error, failures, 0
        self.real = ocp.CheckpointManager.restore

    def __call__(self, manager, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.real(manager, *args, **kwargs)


TRANSIENT = [OSError(5, "Input/output error"),
             ValueError("UNAVAILABLE: Error reading gs://bucket/run/checkpoints/4/state/d/x: "
                        "HTTP response code: 503")]


@pytest.mark.parametrize("error", TRANSIENT, ids=["oserror", "unavailable"])
def test_a_flaky_read_is_retried_and_resumes(tmp_path, monkeypatch, error):
    config = small_config(num_steps=4)
    config.checkpoint.update(save_every=2)
    train_and_evaluate(config, str(tmp_path), progress=False)
    flaky = FlakyRestore(error, failures=2)
    monkeypatch.setattr(ocp.CheckpointManager, "restore",
                        lambda manager, *a, **k: flaky(manager, *a, **k))
    monkeypatch.setattr(Checkpointer, "retry_seconds", 0.0)
    config.train.num_steps = 6
    resumed = train_and_evaluate(config, str(tmp_path), progress=False)
    assert flaky.calls == 3
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_a_lasting_read_error_stops_naming_the_path_and_moves_nothing(tmp_path, monkeypatch):
    config = small_config(num_steps=4)
    config.checkpoint.update(save_every=2)
    train_and_evaluate(config, str(tmp_path), progress=False)
    flaky = FlakyRestore(TRANSIENT[1], failures=100)
    monkeypatch.setattr(ocp.CheckpointManager, "restore",
                        lambda manager, *a, **k: flaky(manager, *a, **k))
    monkeypatch.setattr(Checkpointer, "retry_seconds", 0.0)
    before = (tmp_path / "metrics.jsonl").read_text()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    config.train.num_steps = 6
    with pytest.raises(RuntimeError, match=rf"checkpoint step 4 at {tmp_path}/checkpoints/4 "
                                           rf"could not be read after 5 tries .*UNAVAILABLE.*"
                                           rf"nothing was moved"):
        train_and_evaluate(config, str(tmp_path), progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == saved
    assert not (tmp_path / "corrupt_checkpoints").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing cut back


def test_a_checkpoint_of_another_state_tree_is_refused_not_set_aside(tmp_path):
    """Gradient clipping adds an optimiser state: the saved tree no longer fits. That is the
    config's doing, not damage: one line, nothing moved."""
    config = small_config(num_steps=4)
    config.train.num_steps = 2
    config.checkpoint.update(save_every=2)
    config.optimizer.grad_clip = 1.0
    train_and_evaluate(config, str(tmp_path), progress=False)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    config.optimizer.grad_clip = None
    config.train.num_steps = 4
    with pytest.raises(RuntimeError, match="checkpoint step 2 at .* does not fit this run"):
        train_and_evaluate(config, str(tmp_path), progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == saved
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_damage_is_what_the_files_show(tmp_path):
    step = tmp_path / "7"
    assert "no state item" in damage(step)
    (step / "state").mkdir(parents=True)
    assert "_METADATA is missing" in damage(step)
    (step / "state" / "_METADATA").write_text("{}")
    assert damage(step) is None
    assert damage(step, ValueError(f"DATA_LOSS: Error decoding {step}/state/manifest.ocdbt"))
    assert damage(step, ValueError("DATA_LOSS: Error decoding /elsewhere/x")) is None
    assert damage(step, ValueError("pytree structure error: different types")) is None
    (step / "config").mkdir()
    (step / "config" / "metadata").write_text("{garbage")
    assert "does not parse" in damage(step)


def test_no_readable_checkpoint_names_the_directory(tmp_path):
    config = small_config(num_steps=4)
    config.checkpoint.update(save_every=2)
    train_and_evaluate(config, str(tmp_path), progress=False)
    for step_dir in (tmp_path / "checkpoints").iterdir():
        largest_file(step_dir).write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=f"no readable checkpoint in "
                                           f"{tmp_path / 'checkpoints'}"):
        train_and_evaluate(config, str(tmp_path), progress=False)


def test_cli_corrupt_checkpoint_is_one_line(tmp_path):
    run = cli(*TINY, "--config.train.num_steps=4", "--config.checkpoint.save_every=2",
              "--workdir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    victim = largest_file(tmp_path / "checkpoints" / "4")
    victim.write_bytes(victim.read_bytes()[:10])
    again = cli(*TINY, "--config.train.num_steps=6", "--config.checkpoint.save_every=2",
                "--workdir", str(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr, again.stderr[-3000:]
    assert len(again.stderr.strip().splitlines()) <= 3, again.stderr
    assert "checkpoint step 4" in again.stderr and "resumed from" in again.stdout
    assert "at step 2" in again.stdout


def test_checkpoint_holds_the_config_and_a_shape_change_is_refused(tmp_path):
    config = small_config(num_steps=2)
    config.optimizer.total_steps = 10
    config.checkpoint.save_every = 2
    train_and_evaluate(config, str(tmp_path), progress=False)
    saved = json.loads((tmp_path / "checkpoints" / "2" / "config" / "metadata").read_text())
    assert saved["model"]["embed_dim"] == 16
    config.model.embed_dim = 32
    config.train.num_steps = 4
    with pytest.raises(ValueError, match=r"model\.embed_dim \(16 -> 32\) changed"):
        train_and_evaluate(config, str(tmp_path), progress=False)
    # a change that keeps every shape resumes
    config.model.embed_dim = 16
    config.optimizer.learning_rate = 5e-3
    assert int(train_and_evaluate(config, str(tmp_path), progress=False)["state"].step) == 4


# ---------------------------------------------------------------------------- preemption


def test_sigterm_saves_and_exits_with_the_preemption_status(tmp_path):
    args = [*TINY, "--config.train.num_steps=100000", "--config.checkpoint.save_every=100000",
            "--workdir", str(tmp_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3:"):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED == 3, err[-2000:]
    saved = [line for line in out.splitlines() if line.startswith("SIGTERM: saved step")]
    assert len(saved) == 1, out[-2000:]
    step = int(saved[0].split()[3])
    assert (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").is_file()
    assert not (tmp_path / "lock").exists()
    rows = strict_rows(tmp_path / "metrics.jsonl")
    # a spot VM's ~30 s go to the save alone: no evaluation after SIGTERM
    assert "eval_loss" not in out and not any("eval_loss" in r for r in rows), out[-1000:]
    assert "exiting without evaluating" in out
    assert "\r" not in out + err  # no progress bar when stdout/stderr are not terminals
    assert rows[0]["tokens_per_second"] is None  # step 1 (compilation) is not throughput
    assert all(r["tokens_per_second"] > 0 for r in rows[1:] if "tokens_per_second" in r)


def test_checkpointer_agrees_on_preemption_in_one_process(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=1, max_to_keep=1)
    assert not checkpointer.preemption_agreed(1)
    checkpointer.preempted = True
    assert checkpointer.preemption_agreed(2)
    checkpointer.close()


# ---------------------------------------------------------------------------- metrics


def test_metrics_do_not_repeat_rows_after_a_resume(tmp_path):
    config = small_config(num_steps=4)
    config.checkpoint.save_every = 2
    config.train.log_every = 1
    train_and_evaluate(config, str(tmp_path), progress=False)
    # an interrupted run had written rows past its last checkpoint (4): steps 5 and 6
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    config.train.num_steps = 6
    train_and_evaluate(config, str(tmp_path), progress=False)
    rows = strict_rows(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(tmp_path):
    """SIGKILL a run at 5 random moments (a random step, then a random fraction of a second:
    inside a step, a save or the metrics writing), restart the same command each time: the
    final parameters equal those of an uninterrupted run, bit for bit."""
    steps = 60
    args = [*TINY, f"--config.train.num_steps={steps}", "--config.checkpoint.save_every=1",
            "--config.checkpoint.max_to_keep=2", "--config.train.log_every=1"]
    straight = cli(*args, "--workdir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    rng = random.Random(12)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    workdir = str(tmp_path / "killed")
    targets = sorted(rng.sample(range(3, steps - 5), 5))
    killed_at = []
    for target in targets:
        proc = subprocess.Popen([sys.executable, "-m", "mmjax.train", *args, "--workdir",
                                 workdir], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=open(tmp_path / "stderr", "w"), text=True)
        try:
            for line in proc.stdout:
                if line.startswith("step ") and int(line.split()[1].rstrip(":")) >= target:
                    time.sleep(rng.uniform(0.0, 0.3))
                    proc.send_signal(signal.SIGKILL)
                    killed_at.append(line.split(":")[0])
                    break
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-3000:]
    assert len(killed_at) == 5, killed_at
    final = cli(*args, "--workdir", workdir)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resumed from" in final.stdout
    for a, b in zip(saved_params(tmp_path / "straight", steps), saved_params(workdir, steps)):
        np.testing.assert_array_equal(a, b)
    train_steps = [r["step"] for r in strict_rows(pathlib.Path(workdir) / "metrics.jsonl")
                   if "loss" in r]
    assert train_steps == list(range(1, steps + 1))


TWO_PROCESSES = """
import os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{os.environ['MP_PORT']}", num_processes=2,
                           process_id=int(os.environ["MP_ID"]))
sys.argv = ["mmjax.train"] + sys.argv[1:]
from mmjax.train.__main__ import run
run()
"""


@pytest.mark.slow
@pytest.mark.parametrize("second_delay", [2.0, None])
def test_two_processes_agree_on_the_preemption_step(tmp_path, second_delay):
    """Two CPU processes (gloo collectives) of one run: SIGTERM to process 0, and to process 1
    2 s later (or never): both save the same step and exit 3, no hang."""
    script = tmp_path / "run2.py"
    script.write_text(TWO_PROCESSES)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*TINY, "--config.train.num_steps=100000", "--config.checkpoint.save_every=100000",
            "--workdir", str(tmp_path / "run")]
    procs = []
    for i in range(2):
        env = dict(os.environ, MP_PORT=str(port), MP_ID=str(i), PYTHONUNBUFFERED="1",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), *args], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
            stderr=open(tmp_path / f"err{i}", "w")))
    try:
        for line in procs[0].stdout:
            if line.startswith("step 5:"):
                break
        procs[0].send_signal(signal.SIGTERM)
        if second_delay is not None:
            time.sleep(second_delay)
            procs[1].send_signal(signal.SIGTERM)
        out = procs[0].stdout.read()
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], (tmp_path / "err0").read_text()[-2000:]
    saved = [line for line in out.splitlines() if line.startswith("SIGTERM: saved step")]
    step = int(saved[0].split()[3])
    assert (tmp_path / "run" / "checkpoints" / str(step) / "state").is_dir()
