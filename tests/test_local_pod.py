"""launch/local_pod.py: a pod of CPU processes on one machine, joined by jax.distributed.

The exit-status rule and the environment of each process are checked as functions; real pods
of two ``mmjax.train`` processes (2 fake devices each) train and checkpoint, stop on SIGTERM
with the preemption status, and fail fast on a bad flag; fake processes check that a crash
does not leave the others hanging.
"""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
from config_loading import TINY as TINY_FLAGS

from mmjax.cli import EXIT_PREEMPTED
from mmjax.train import __main__ as train_main

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "launch" / "local_pod.py"

_spec = importlib.util.spec_from_file_location("launch_local_pod", SCRIPT)
local_pod = sys.modules["launch_local_pod"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_pod)

TINY = ["--config", "configs/mm_v1_small.py:tiny", *TINY_FLAGS]
POD = [sys.executable, str(SCRIPT), "--processes=2", "--devices_per_process=2"]  # torus


def test_exit_status_rule():
    assert local_pod.EXIT_PREEMPTED == EXIT_PREEMPTED
    assert local_pod.pod_status([0, 0, 0]) == 0
    assert local_pod.pod_status([3, 3]) == 3
    assert local_pod.pod_status([0, 3]) == 3  # one finished, one saved on SIGTERM
    assert local_pod.pod_status([3, 1, 2]) == 1  # the first error, in the order they ended
    assert local_pod.pod_status([2, 1]) == 2
    assert local_pod.pod_status([1, -9]) == 1
    assert local_pod.pod_status([-9, 1]) == 137  # killed by SIGKILL first
    assert local_pod.pod_status([3, -15]) == 143
    assert local_pod.pod_status([5]) == 5


def test_each_process_gets_its_devices_and_the_coordinator():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                            "--xla_backend_optimization_level=0", "HOME": "/h"}
    env = local_pod.process_environment(1, 4, 2, 1234, environ=environ)
    assert env["XLA_FLAGS"] == ("--xla_backend_optimization_level=0 "
                                "--xla_force_host_platform_device_count=2")
    assert (env["JAX_PLATFORMS"], env["MMJAX_COORDINATOR_ADDRESS"], env["MMJAX_NUM_PROCESSES"],
            env["MMJAX_PROCESS_ID"], env["HOME"]) == ("cpu", "127.0.0.1:1234", "4", "1", "/h")
    assert env["PYTHONPATH"] == str(REPO_ROOT)
    # what mmjax.train --distributed makes of them
    assert train_main.distributed_arguments(env) == dict(
        coordinator_address="127.0.0.1:1234", num_processes=4, process_id=1)


def test_device_order_flag():
    assert local_pod.trainer_command(["--workdir", "/w"], "torus")[2:] == [
        "mmjax.train", "--distributed", "--workdir", "/w", "--config.sharding.device_order=torus"]
    assert local_pod.trainer_command(["--workdir", "/w"], "linear")[2:] == [
        "mmjax.train", "--distributed", "--workdir", "/w"]
    assert local_pod.parse_args(["--"]).device_order == "torus"


def test_distributed_variables_all_or_none():
    assert train_main.distributed_arguments({}) == {}  # a TPU pod: JAX finds the hosts
    with pytest.raises(ValueError, match="MMJAX_PROCESS_ID set without "
                                         "MMJAX_COORDINATOR_ADDRESS, MMJAX_NUM_PROCESSES"):
        train_main.distributed_arguments({"MMJAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="must be integers"):
        train_main.distributed_arguments({"MMJAX_COORDINATOR_ADDRESS": "h:1",
                                          "MMJAX_NUM_PROCESSES": "two", "MMJAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"MMJAX_PROCESS_ID=2 is not in \[0, "):
        train_main.distributed_arguments({"MMJAX_COORDINATOR_ADDRESS": "h:1",
                                          "MMJAX_NUM_PROCESSES": "2", "MMJAX_PROCESS_ID": "2"})


def test_trainer_refuses_partial_variables_in_one_line():
    env = {**os.environ, "MMJAX_PROCESS_ID": "0", "JAX_PLATFORMS": "cpu"}
    env.pop("MMJAX_COORDINATOR_ADDRESS", None)
    env.pop("MMJAX_NUM_PROCESSES", None)
    run = subprocess.run([sys.executable, "-m", "mmjax.train", "--distributed"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "error: MMJAX_PROCESS_ID set without MMJAX_COORDINATOR_ADDRESS, MMJAX_NUM_PROCESSES: "
        "set all of MMJAX_COORDINATOR_ADDRESS, MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID, or none"]


@pytest.mark.parametrize("argv, message", [
    (["--processes=0", "--"], "local_pod.py: error: --processes 0: must be >= 1"),
    (["--devices_per_process=0", "--"],
     "local_pod.py: error: --devices_per_process 0: must be >= 1"),
    (["--processes=2", "--config", "x.py"],
     "local_pod.py: error: missing -- before the mmjax.train flags (e.g. -- --config "
     "configs/mm_v1_small.py:tiny --workdir /tmp/pod)"),
    (["--device_order=ring", "--"], "local_pod.py: error: argument --device_order: invalid "
                                    "choice: 'ring' (choose from 'linear', 'torus')"),
])
def test_bad_arguments_give_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        local_pod.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


CRASH_OR_WAIT = """
import os, sys, time
if os.environ["MMJAX_PROCESS_ID"] == "1":
    sys.exit(1)
time.sleep(600)
"""


def test_a_crash_does_not_leave_the_others_hanging(tmp_path, monkeypatch, capsys):
    """Process 1 fails at once; process 0 would wait forever for it: it is killed after the
    grace period, and the pod exits with process 1's status."""
    monkeypatch.setattr(local_pod, "trainer_command",
                        lambda flags, order: [sys.executable, "-c", CRASH_OR_WAIT])
    start = time.monotonic()
    status = local_pod.main(["--processes=2", "--grace_s=1", f"--log_dir={tmp_path}", "--"])
    assert status == 1
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "process 1 exited with status 1 1 s ago; killing process(es) [0]" in err
    assert "exit statuses by process [-9, 1]: exit 1" in err


IGNORE_SIGTERM = """
import os, pathlib, signal, time
signal.signal(signal.SIGTERM, lambda *_: print("got SIGTERM", flush=True))
pathlib.Path(os.environ["READY_DIR"], os.environ["MMJAX_PROCESS_ID"]).touch()
time.sleep(600)
"""


def test_signals_are_forwarded_and_a_second_one_kills(tmp_path, monkeypatch, capsys):
    """SIGTERM to the pod reaches every process as SIGTERM; processes that do not stop get
    SIGKILL from a second signal (here SIGINT, as a second Ctrl-C)."""
    monkeypatch.setattr(local_pod, "trainer_command",
                        lambda flags, order: [sys.executable, "-c", IGNORE_SIGTERM])
    monkeypatch.setenv("READY_DIR", str(tmp_path))
    logs = tmp_path / "logs"

    def signal_twice():
        deadline = time.monotonic() + 60
        while not all((tmp_path / str(i)).exists() for i in range(3)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        while not all("got SIGTERM" in (logs / f"process_{i}.log").read_text() for i in (1, 2)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=signal_twice)
    thread.start()
    try:
        status = local_pod.main(["--processes=3", f"--log_dir={logs}", "--"])
    finally:
        thread.join()
    assert status == 128 + signal.SIGKILL
    assert (logs / "process_1.log").read_text() == "got SIGTERM\n"
    err = capsys.readouterr().err
    assert "got SIGTERM: sending SIGTERM to every process" in err
    assert "got SIGINT: sending SIGKILL to every process" in err
    assert "exit statuses by process [-9, -9, -9]: exit 137" in err


def test_two_processes_train_and_checkpoint(tmp_path):
    run = subprocess.run([*POD, f"--log_dir={tmp_path / 'logs'}", "--", *TINY,
                          "--config.train.num_steps=3", "--workdir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mesh {'data': 4," in run.stdout  # 2 processes x 2 devices, one mesh
    assert "step 3:" in run.stdout and "final (step 3)" in run.stdout
    assert (tmp_path / "run" / "checkpoints" / "3" / "state").is_dir()
    assert "Connecting to JAX distributed service" in (tmp_path / "logs" /
                                                        "process_1.log").read_text()
    assert run.stderr.splitlines()[-1] == "local_pod: exit statuses by process [0, 0]: exit 0"
    each_runs = next(line for line in run.stderr.splitlines() if "each runs:" in line)
    assert each_runs.endswith(" --config.sharding.device_order=torus")


def test_a_bad_flag_fails_every_process_quickly(tmp_path):
    start = time.monotonic()
    run = subprocess.run([*POD, f"--log_dir={tmp_path}", "--", "--config.model.nonexistent=1"],
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert run.returncode == 2, run.stderr[-3000:]
    assert time.monotonic() - start < 60
    assert "error: unknown config key in --config.model.nonexistent=1" in run.stderr
    assert "unknown config key" in (tmp_path / "process_1.log").read_text()
    assert "local_pod: exit statuses by process [2, 2]: exit 2" in run.stderr


def test_sigterm_to_the_pod_saves_and_exits_3(tmp_path):
    """What a spot preemption does to a slice: every process gets SIGTERM, they agree on a
    step, save it, and exit 3; the pod exits 3."""
    with open(tmp_path / "err", "w") as err:
        pod = subprocess.Popen(
            [*POD, f"--log_dir={tmp_path / 'logs'}", "--", *TINY,
             "--config.train.num_steps=100000", "--config.checkpoint.save_every=100000",
             "--workdir", str(tmp_path / "run")],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO_ROOT)
        try:
            for line in pod.stdout:
                if line.startswith("step 3:"):
                    break
            pod.send_signal(signal.SIGTERM)
            out = pod.stdout.read()
            status = pod.wait(timeout=120)
        finally:
            pod.kill()
            pod.wait()
    errors = (tmp_path / "err").read_text()
    assert status == EXIT_PREEMPTED, errors[-3000:]
    saved = [line for line in out.splitlines() if line.startswith("SIGTERM: saved step")]
    assert len(saved) == 1, out[-2000:]
    step = int(saved[0].split()[3])
    assert (tmp_path / "run" / "checkpoints" / str(step) / "state").is_dir()
    assert "got SIGTERM: sending SIGTERM to every process" in errors
    assert "exit statuses by process [3, 3]: exit 3" in errors
