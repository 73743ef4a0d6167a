"""A pod on one machine: N processes of ``python -m mmjax.train`` joined by ``jax.distributed``.

    python launch/local_pod.py --processes 2 --devices_per_process 4 -- \\
        --config configs/mm_v1_small.py:tiny --workdir /tmp/pod-run

Each process is one "host" of M fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=M``, ``JAX_PLATFORMS=cpu``); they meet at
a coordinator on ``127.0.0.1`` (``--port``, default a free one) through the ``MMJAX_*``
variables that ``mmjax.train --distributed`` reads, and exchange data with gloo collectives. So
the multi-host code paths (per-host batch rows, Orbax's multi-process saves, the preemption
agreement) run as on a pod, without one. The words after ``--`` go to every process as they
are, after ``--distributed``; ``--device_order torus`` (the default) adds
``--config.sharding.device_order=torus``, which orders the fake devices the way a TPU slice's
torus does (each host's batch rows spread over the global batch); ``linear`` keeps JAX's order.

Output: process 0's stdout and stderr pass through; process i's go to ``LOG_DIR/process_i.log``
(``--log_dir``, default a new temporary directory, named on stderr at the start).

Exit status: 0 when every process exits 0; otherwise the first (in time) status that is
neither 0 nor 3; otherwise 3 (``EXIT_PREEMPTED``: the run saved and can resume). A process
killed by signal S counts as 128 + S. When a process has ended and others are still running
``--grace_s`` seconds later (default 60), those are killed (SIGKILL): a process whose peers
have died would otherwise wait for them in a collective. SIGTERM or SIGINT (Ctrl-C) to this
script sends SIGTERM to every process (what a preemption does: they save the same step and exit
3); a second one sends SIGKILL. Bad arguments print one line and exit 2. This file needs only
the Python standard library.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

EXIT_PREEMPTED = 3  # mmjax.cli.EXIT_PREEMPTED (not imported: importing mmjax imports jax)
DEVICE_ORDER_FLAGS = {"torus": ["--config.sharding.device_order=torus"], "linear": []}
KILL_POLL_S = 0.1


def pod_status(statuses: Sequence[int]) -> int:
    """The pod's exit status from its processes', in the order they ended.

    All 0: 0. Otherwise the first status that is neither 0 nor ``EXIT_PREEMPTED``; otherwise
    (only 0s and 3s) ``EXIT_PREEMPTED``. A negative status (killed by a signal, as
    ``subprocess`` reports it) counts as 128 + the signal number, as in a shell.
    """
    codes = [128 - s if s < 0 else s for s in statuses]
    for code in codes:
        if code not in (0, EXIT_PREEMPTED):
            return code
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_environment(index: int, processes: int, devices: int, port: int,
                        environ=os.environ) -> dict[str, str]:
    """The environment of process ``index``: fake CPU devices and the coordinator's address.

    Other ``XLA_FLAGS`` are kept; any device count in them is replaced.
    """
    xla_flags = [flag for flag in environ.get("XLA_FLAGS", "").split()
                 if not flag.startswith("--xla_force_host_platform_device_count")]
    python_path = [str(REPO_ROOT), *filter(None, [environ.get("PYTHONPATH")])]
    return {
        **environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*xla_flags, f"--xla_force_host_platform_device_count={devices}"]),
        "MMJAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "MMJAX_NUM_PROCESSES": str(processes),
        "MMJAX_PROCESS_ID": str(index),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(python_path),
    }


def trainer_command(trainer_flags: Sequence[str], device_order: str) -> list[str]:
    return [sys.executable, "-m", "mmjax.train", "--distributed", *trainer_flags,
            *DEVICE_ORDER_FLAGS[device_order]]


def _die_with_parent() -> None:
    """In the child: SIGKILL when local_pod dies (Linux), so no trainer outlives it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="local_pod.py", description=__doc__.split("\n\n")[0],
                     usage="local_pod.py [options] -- MMJAX_TRAIN_FLAGS...")
    parser.add_argument("--processes", type=int, default=2,
                        help="number of processes (hosts), default 2")
    parser.add_argument("--devices_per_process", type=int, default=4,
                        help="fake CPU devices per process, default 4 (a TPU VM's 4 chips)")
    parser.add_argument("--device_order", choices=sorted(DEVICE_ORDER_FLAGS), default="torus",
                        help="torus (default): order the devices like a TPU slice; linear: "
                             "JAX's order")
    parser.add_argument("--port", type=int, default=0,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--log_dir", help="where processes 1.. write their output "
                                          "(default: a new temporary directory)")
    parser.add_argument("--grace_s", type=float, default=60.0,
                        help="seconds the others may run on after a process ended (default 60)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    parser = make_parser()
    if "--" not in argv:
        parser.error("missing -- before the mmjax.train flags (e.g. -- --config "
                     "configs/mm_v1_small.py:tiny --workdir /tmp/pod)")
    cut = argv.index("--")
    args = parser.parse_args(argv[:cut])
    args.trainer_flags = argv[cut + 1:]
    if args.processes < 1:
        parser.error(f"--processes {args.processes}: must be >= 1")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process {args.devices_per_process}: must be >= 1")
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port}: must be in [0, 65535]")
    if args.grace_s < 0:
        parser.error(f"--grace_s {args.grace_s}: must be >= 0")
    return args


def _log(message: str) -> None:
    print(f"local_pod: {message}", file=sys.stderr, flush=True)


def run_pod(args: argparse.Namespace) -> int:
    port = args.port or free_port()
    log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(prefix="mmjax-local-pod-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    command = trainer_command(args.trainer_flags, args.device_order)
    _log(f"{args.processes} processes x {args.devices_per_process} devices, coordinator "
         f"127.0.0.1:{port}; process 0's output follows, the others' are in {log_dir}/")
    _log(f"each runs: {shlex.join(command)}")

    procs: list[subprocess.Popen] = []
    signals = 0

    def forward(signum, frame):
        nonlocal signals
        signals += 1
        sig = signal.SIGTERM if signals == 1 else signal.SIGKILL
        _log(f"got {signal.Signals(signum).name}: sending {sig.name} to every process")
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    logs = []
    try:
        for index in range(args.processes):
            if index == 0:
                output = None  # passes through
            else:
                logs.append(open(log_dir / f"process_{index}.log", "w"))
                output = logs[-1]
            procs.append(subprocess.Popen(
                command, env=process_environment(index, args.processes,
                                                 args.devices_per_process, port),
                stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True,  # Ctrl-C reaches local_pod only; it forwards SIGTERM
                preexec_fn=_die_with_parent))
        return _wait(procs, args.grace_s, log_dir)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for file in logs:
            file.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(procs: list[subprocess.Popen], grace_s: float, log_dir: pathlib.Path) -> int:
    ended: list[tuple[int, int]] = []  # (process, status) in the order they ended
    deadline = None
    while len(ended) < len(procs):
        for index, proc in enumerate(procs):
            if index not in (i for i, _ in ended) and proc.poll() is not None:
                ended.append((index, proc.returncode))
                if deadline is None:
                    deadline = time.monotonic() + grace_s
        if len(ended) < len(procs) and deadline is not None and time.monotonic() > deadline:
            running = [i for i, p in enumerate(procs) if p.poll() is None]
            first, status = ended[0]
            _log(f"process {first} exited with status {status} {grace_s:g} s ago; killing "
                 f"process(es) {running}")
            for index in running:
                procs[index].kill()
            deadline = float("inf")
        time.sleep(KILL_POLL_S)
    status = pod_status([s for _, s in ended])
    by_process = [s for _, s in sorted(ended)]
    _log(f"exit statuses by process {by_process}: exit {status}")
    if status != 0 and len(procs) > 1:
        _log(f"the other processes' output: {log_dir}/process_*.log")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_pod(args)


if __name__ == "__main__":
    sys.exit(main())
