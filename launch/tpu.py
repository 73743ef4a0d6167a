"""Run mmjax on a Cloud TPU VM slice (v4, v5e, v5p): create, set up, run, follow, stop, delete.

    python launch/tpu.py create --project=P --zone=Z --name=N --generation=v4 \\
        --accelerator-type=v4-32 [--spot] [--queued]
    python launch/tpu.py setup  --project=P --zone=Z --name=N       # copy HEAD, install
    python launch/tpu.py run    --project=P --zone=Z --name=N --config=configs/X.py \\
        --workdir=/shared/run1 -- --config.train.num_steps=1000    # all hosts; follow worker 0
    python launch/tpu.py logs   --project=P --zone=Z --name=N       # follow worker 0 again
    python launch/tpu.py stop   --project=P --zone=Z --name=N       # SIGTERM: save, then exit
    python launch/tpu.py stop   --project=P --zone=Z --name=N --kill    # SIGKILL: a hung run
    python launch/tpu.py delete --project=P --zone=Z --name=N [--queued]
    python launch/tpu.py status --project=P --zone=Z --name=N [--queued]
    python launch/tpu.py keep-alive --project=P --zone=Z --name=N --generation=v5e \
        --accelerator-type=v5litepod-16 --spot [--queued] --config=configs/X.py \
        --workdir=/shared/run1 [--max-restarts=10] -- --config.train.num_steps=1000

Every subcommand takes ``--dry-run``: it prints the exact commands (``gcloud``, and ``git
archive`` for ``setup``), one per line, ready to paste into a shell, and runs nothing. Without
it, the same argument lists go to ``subprocess.run`` one after the other; the first that fails
stops the script with its exit status. Bad arguments print one line and exit 2.

``keep-alive`` is ``create``, ``setup`` and ``run`` in a loop: when the run exits with status 3
(preempted: it saved) or the slice is lost (its state is not READY, or ACTIVE for a queued
resource, or it is gone), it deletes the slice, creates and sets it up again, and runs the same
command, which resumes from the workdir's latest checkpoint; until the run exits 0, exits with
an error (1, 2: not retried), or ``--max-restarts`` is reached (exit 3, one line).

On the workers the code lives in ``~/mmjax`` with its virtualenv in ``~/mmjax/.venv``; a run
writes ``~/mmjax-train.log`` and ``~/mmjax-train.pid`` on each worker. ``launch/README.md``
walks through a v4-32 and a v5e-256 run. This file needs only the Python standard library.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

REMOTE_DIR = "~/mmjax"  # the code on every worker (a shell word: ~ expands remotely)
REMOTE_TARBALL = "mmjax-src.tar.gz"  # in the worker's home directory
LOG = "~/mmjax-train.log"
PID = "~/mmjax-train.pid"
PYTHON_VERSION = "3.11"  # numpy 2.4 and jax 0.10 need >= 3.11; the TPU images ship 3.10


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: how its accelerator types are spelled and counted.

    ``runtime_version`` is the TPU VM software version that the Cloud TPU docs ("TPU software
    versions", PyTorch and JAX) name for the generation. The number in an accelerator type
    counts TensorCores on v4 and v5p (2 per chip, one JAX device per chip) and chips on v5e.
    Multi-host slices have 4 chips per TPU VM (host, JAX process).
    """

    name: str
    prefix: str
    runtime_version: str
    cores_per_chip: int
    single_host_chips: int  # slices up to this many chips are one VM
    sizes: tuple[int, ...] | None = None  # the valid numbers, when the docs give a closed list

    def chips(self, accelerator_type: str) -> int:
        return int(accelerator_type.removeprefix(self.prefix)) // self.cores_per_chip

    def hosts(self, accelerator_type: str) -> int:
        chips = self.chips(accelerator_type)
        return 1 if chips <= self.single_host_chips else chips // CHIPS_PER_HOST

    def check(self, accelerator_type: str) -> str | None:
        """None if ``accelerator_type`` is a slice of this generation, else why not."""
        match = re.fullmatch(re.escape(self.prefix) + r"([1-9][0-9]*)", accelerator_type)
        example = {"v4": "v4-32", "v5e": "v5litepod-256", "v5p": "v5p-128"}[self.name]
        if match is None:
            return (f"accelerator type {accelerator_type!r} is not a {self.name} slice "
                    f"({self.prefix}N, e.g. {example})")
        number = int(match.group(1))
        if self.sizes is not None and number not in self.sizes:
            return (f"accelerator type {accelerator_type!r}: {self.name} slices are "
                    f"{', '.join(self.prefix + str(s) for s in self.sizes)}")
        if self.sizes is None and number % 8:
            return (f"accelerator type {accelerator_type!r}: {self.name} slices count "
                    f"TensorCores in multiples of 8 (e.g. {example})")
        return None


CHIPS_PER_HOST = 4
GENERATIONS = {
    "v4": Generation("v4", "v4-", "tpu-ubuntu2204-base", cores_per_chip=2,
                     single_host_chips=4),
    "v5e": Generation("v5e", "v5litepod-", "v2-alpha-tpuv5-lite", cores_per_chip=1,
                      single_host_chips=8, sizes=(1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": Generation("v5p", "v5p-", "v2-alpha-tpuv5", cores_per_chip=2, single_host_chips=4),
}


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Command builders: pure functions from options to argument lists.


def _gcloud(*words: str, args) -> list[str]:
    return ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}",
            f"--project={args.project}"]


def _ssh(args, remote_command: str, worker: str = "all") -> list[str]:
    return [*_gcloud("tpu-vm", "ssh", args.name, args=args), f"--worker={worker}",
            f"--command={remote_command}"]


def create_commands(args) -> list[list[str]]:
    generation = GENERATIONS[args.generation]
    runtime = args.runtime_version or generation.runtime_version
    if args.queued:
        command = [*_gcloud("queued-resources", "create", args.queued_resource_id or args.name,
                            args=args),
                   f"--node-id={args.name}", f"--accelerator-type={args.accelerator_type}",
                   f"--runtime-version={runtime}"]
    else:
        command = [*_gcloud("tpu-vm", "create", args.name, args=args),
                   f"--accelerator-type={args.accelerator_type}", f"--version={runtime}"]
    if args.spot:
        command.append("--spot")
    return [command]


def local_tarball(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"mmjax-{name}.tar.gz")


def install_command() -> str:
    """Python 3.11 venv (uv fetches the interpreter) and ``pip install -e '.[tpu]'``."""
    return " && ".join([
        f"cd {REMOTE_DIR}",
        "python3 -m pip install --user --quiet uv",
        f"{{ [ -x .venv/bin/python ] || ~/.local/bin/uv venv --seed --python {PYTHON_VERSION}"
        " .venv; }",
        '.venv/bin/pip install --quiet -e ".[tpu]"',
        '.venv/bin/python -c "import jax, mmjax; print(jax.__version__)"',
    ])


def unpack_command() -> str:
    """Unpack the copied tarball over ``~/mmjax`` (its ``.venv`` stays)."""
    return f"mkdir -p {REMOTE_DIR} && tar -xzf ~/{REMOTE_TARBALL} -C {REMOTE_DIR}"


def setup_commands(args) -> list[list[str]]:
    if args.repo:
        ref = shlex.quote(args.ref or "main")
        fetch = " && ".join([
            f"{{ [ -d {REMOTE_DIR}/.git ] || git clone --quiet {shlex.quote(args.repo)}"
            f" {REMOTE_DIR}; }}",
            f"git -C {REMOTE_DIR} fetch --quiet origin {ref}",
            f"git -C {REMOTE_DIR} checkout --quiet --detach FETCH_HEAD",
        ])
        return [_ssh(args, f"{fetch} && {install_command()}")]
    tarball = local_tarball(args.name)
    return [
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz", f"--output={tarball}",
         args.ref or "HEAD"],
        [*_gcloud("tpu-vm", "scp", tarball, f"{args.name}:{REMOTE_TARBALL}", args=args),
         "--worker=all"],
        _ssh(args, f"{unpack_command()} && {install_command()}"),
    ]


def train_command(args) -> str:
    """``python -m mmjax.train --distributed ...`` with each argument quoted for the shell."""
    words = [".venv/bin/python", "-m", "mmjax.train", "--distributed",
             f"--config={args.config}", f"--workdir={args.workdir}", *args.overrides]
    return " ".join(shlex.quote(w) for w in words)


def start_command(args) -> str:
    """The remote shell command that starts training on one worker and returns at once.

    It refuses while an earlier run still lives (its pid file names a live process). The
    training process ignores SIGHUP (nohup) and writes only to the log, so a dropped ssh
    connection does not stop it; the subshell around it appends its exit status to the log.
    """
    running = f'[ -f {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null'
    refuse = (f'echo "$(hostname): mmjax.train is already running (pid $(cat {PID})); '
              f'stop it first" >&2; exit 1')
    launch = (f'( trap "" HUP; nohup env PYTHONUNBUFFERED=1 {train_command(args)} & '
              f"echo $! > {PID}; wait $!; "
              f'echo "mmjax.train exited with status $?" ) > {LOG} 2>&1 < /dev/null &')
    return (f"cd {REMOTE_DIR} || exit 1; if {running}; then {refuse}; fi; {launch} "
            f'echo "$(hostname): started mmjax.train (log {LOG})"')


def follow_command() -> str:
    """Print the log from its start and follow it until the training process ends.

    `tail --pid` stops once the trainer is gone, which can be just before the shell around it
    appends the exit status; the lines tail has not shown are printed after it (waiting up
    to 5 s for the status line), so the follower always ends with it.
    """
    status = '^mmjax.train exited with status'
    return (f'if [ -f {PID} ]; then seen="$(mktemp)"; '
            f'tail -n +1 -F --pid="$(cat {PID})" {LOG} | tee "$seen"; '
            f"for _ in $(seq 50); do grep -q '{status}' {LOG} && break; sleep 0.1; done; "
            f'tail -n +"$(($(wc -l < "$seen") + 1))" {LOG}; rm -f "$seen"; '
            f"else tail -n +1 {LOG}; fi")


def stop_command(signal_name: str = "TERM") -> str:
    """SIGTERM (the run saves, then exits) or SIGKILL (for a run that hangs)."""
    return (f'if [ -f {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null; then '
            f'kill -{signal_name} "$(cat {PID})" && echo "$(hostname): sent SIG{signal_name} to '
            f'mmjax.train (pid $(cat {PID}))"; else echo "$(hostname): mmjax.train is not '
            f'running"; fi')


def run_commands(args) -> list[list[str]]:
    commands = [_ssh(args, start_command(args))]
    if args.follow:
        commands.append(_ssh(args, follow_command(), worker="0"))
    return commands


def logs_commands(args) -> list[list[str]]:
    return [_ssh(args, follow_command(), worker=str(args.worker))]


def stop_commands(args) -> list[list[str]]:
    return [_ssh(args, stop_command("KILL" if args.kill else "TERM"))]


def delete_commands(args) -> list[list[str]]:
    if args.queued:
        return [[*_gcloud("queued-resources", "delete", args.queued_resource_id or args.name,
                          args=args), "--force", "--quiet"]]
    return [[*_gcloud("tpu-vm", "delete", args.name, args=args), "--quiet"]]


def status_commands(args) -> list[list[str]]:
    if args.queued:
        return [_gcloud("queued-resources", "describe", args.queued_resource_id or args.name,
                        args=args)]
    return [_gcloud("tpu-vm", "describe", args.name, args=args)]


def state_command(args) -> list[str]:
    """``describe`` printing only the state: READY, PREEMPTED, ... (a queued resource: ACTIVE,
    WAITING_FOR_RESOURCES, SUSPENDED, ...)."""
    field = "state.state" if args.queued else "state"
    return [*status_commands(args)[0], f"--format=value({field})"]


def healthy_state(args) -> str:
    return "ACTIVE" if args.queued else "READY"


def keep_alive_commands(args) -> list[list[str]]:
    """What ``keep-alive --dry-run`` prints: one attempt, then what a restart adds. A comment
    is a one-word list starting with ``#``."""
    commands = []
    if not args.attach:
        commands += create_commands(args)
        if args.queued:
            commands += [["# wait until its state is ACTIVE:"], state_command(args)]
        commands += setup_commands(args)
    commands += [_ssh(args, start_command(args)), _ssh(args, follow_command(), worker="0")]
    commands += [[f"# on exit status 3 or a lost slice (at most --max-restarts="
                  f"{args.max_restarts} times):"],
                 state_command(args),
                 [f"# if it is not {healthy_state(args)}: delete, create and set up again"],
                 *delete_commands(args),
                 ["# then run and follow again, as above"]]
    return commands


BUILDERS: dict[str, Callable] = {
    "create": create_commands, "setup": setup_commands, "run": run_commands,
    "logs": logs_commands, "stop": stop_commands, "delete": delete_commands,
    "status": status_commands, "keep-alive": keep_alive_commands,
}

# ---------------------------------------------------------------------------------------------
# Arguments.

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_OVERRIDE = re.compile(r"--config\.[A-Za-z_][A-Za-z0-9_.]*=.*", re.DOTALL)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", required=True, help="Google Cloud project id")
    common.add_argument("--zone", required=True, help="zone of the slice, e.g. us-central2-b")
    common.add_argument("--name", required=True, help="name of the TPU VM slice (node id)")
    common.add_argument("--dry-run", action="store_true",
                        help="print the commands, one per line, and run nothing")
    queued = argparse.ArgumentParser(add_help=False)
    queued.add_argument("--queued", action="store_true",
                        help="the slice comes from a queued resource")
    queued.add_argument("--queued-resource-id", help="queued resource id (default: --name)")

    creating = argparse.ArgumentParser(add_help=False)
    creating.add_argument("--generation", required=True, help="v4, v5e or v5p")
    creating.add_argument("--accelerator-type", required=True,
                          help="e.g. v4-32, v5litepod-256, v5p-128")
    creating.add_argument("--runtime-version",
                          help="TPU VM software version (default: the generation's)")
    creating.add_argument("--spot", action="store_true", help="Spot VMs (preemptible)")
    setting_up = argparse.ArgumentParser(add_help=False)
    setting_up.add_argument("--repo",
                            help="clone this git URL on the workers instead of copying")
    setting_up.add_argument("--ref",
                            help="commit, branch or tag (default: HEAD; main with --repo)")
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--config", required=True,
                         help="configs/NAME.py[:preset], from the repo")
    running.add_argument("--workdir", required=True,
                         help="an absolute path that all workers share (NFS, or a bucket "
                              "mounted with gcsfuse)")

    parser = _Parser(prog="tpu.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("create", parents=[common, queued, creating], help="create a slice")
    sub.add_parser("setup", parents=[common, setting_up],
                   help="copy (or clone) the code to every worker and install it")
    run = sub.add_parser("run", parents=[common, running],
                         help="start mmjax.train on every worker",
                         epilog="Config overrides go after --, e.g. -- --config.train.seed=1")
    run.add_argument("--no-follow", dest="follow", action="store_false",
                     help="start and return, without following worker 0's log")

    logs = sub.add_parser("logs", parents=[common], help="follow a worker's training log")
    logs.add_argument("--worker", type=int, default=0, help="worker index (default 0)")
    stop = sub.add_parser("stop", parents=[common], help="SIGTERM the run: it saves, then exits")
    stop.add_argument("--kill", action="store_true",
                      help="SIGKILL instead: for a run that does not stop (no save)")
    sub.add_parser("delete", parents=[common, queued], help="delete the slice")
    sub.add_parser("status", parents=[common, queued], help="describe the slice")
    keep = sub.add_parser(
        "keep-alive", parents=[common, queued, creating, setting_up, running],
        help="create, set up and run; after a preemption or a lost slice, do it again",
        epilog="Config overrides go after --, e.g. -- --config.train.seed=1")
    keep.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int,
                      default=10, help="give up after this many restarts (default 10)")
    keep.add_argument("--attach", action="store_true",
                      help="the slice exists and is set up: start by running on it")
    keep.add_argument("--poll-interval", type=float, default=60.0,
                      help="seconds between state checks while a queued resource waits, and "
                           "before retrying a failed restart (default 60)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    parser = make_parser()
    args = parser.parse_args(argv)
    args.overrides = overrides
    try:
        _check(args)
    except UsageError as e:
        parser.exit(2, f"tpu.py {args.command}: error: {e}\n")
    return args


def _check(args) -> None:
    for key in ("project", "zone"):
        if not getattr(args, key).strip():
            raise UsageError(f"--{key} is empty")
    if not _NAME.fullmatch(args.name):
        raise UsageError(f"--name {args.name!r}: lowercase letters, digits and '-', starting "
                         "with a letter, at most 63 characters")
    if args.overrides and args.command not in ("run", "keep-alive"):
        raise UsageError(f"arguments after -- are config overrides, for run and keep-alive "
                         f"only: {args.overrides}")
    if args.command in ("create", "keep-alive"):
        if args.generation not in GENERATIONS:
            raise UsageError(f"unknown generation {args.generation!r}: v4, v5e or v5p")
        problem = GENERATIONS[args.generation].check(args.accelerator_type)
        if problem:
            raise UsageError(problem)
        if args.queued_resource_id and not args.queued:
            raise UsageError("--queued-resource-id needs --queued")
    if args.command in ("setup", "keep-alive") and args.ref is not None and not args.ref.strip():
        raise UsageError("--ref is empty")
    if args.command in ("run", "keep-alive"):
        _check_run(args)
    if args.command == "keep-alive":
        if args.max_restarts < 0:
            raise UsageError(f"--max-restarts {args.max_restarts}: must be >= 0")
        if args.poll_interval < 0:
            raise UsageError(f"--poll-interval {args.poll_interval:g}: must be >= 0")


def _check_run(args) -> None:
    if args.workdir.startswith("gs://"):
        bucket, _, rest = args.workdir[len("gs://"):].partition("/")
        if not (bucket and rest.strip("/")):
            raise UsageError(f"--workdir {args.workdir!r}: a gs:// workdir needs a bucket and "
                             "a path in it (gs://BUCKET/PATH)")
    elif "://" in args.workdir:
        raise UsageError(f"--workdir {args.workdir!r}: only gs://BUCKET/PATH URLs or an "
                         "absolute path that all workers share (launch/README.md)")
    elif not args.workdir.startswith("/"):
        raise UsageError(f"--workdir {args.workdir!r} must be an absolute path that all "
                         "workers share")
    config_file = args.config.split(":", 1)[0]
    if os.path.isabs(config_file) or not (REPO_ROOT / config_file).is_file():
        raise UsageError(f"--config {args.config!r}: no file {config_file!r} in the repository "
                         "(give a path relative to its root, e.g. configs/mm_v1_small.py)")
    for override in args.overrides:
        if not _OVERRIDE.fullmatch(override):
            raise UsageError(f"override {override!r} is not --config.KEY=VALUE")


# ---------------------------------------------------------------------------------------------
# Running.


def subprocess_runner(argv: list[str]) -> int:
    return subprocess.run(argv).returncode


def subprocess_reader(argv: list[str], on_line: Callable[[str], None] | None = None
                      ) -> tuple[int, str]:
    """Run ``argv``, handing each line of its stdout to ``on_line`` as it comes (stderr passes
    through); its exit status and whole stdout."""
    lines = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, errors="replace") as proc:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
    return proc.returncode, "".join(lines)


EXIT_PREEMPTED = 3  # mmjax.train's status after SIGTERM made it save (mmjax.cli)
FOLLOW_TRIES = 3  # follows of a READY slice's run that may end without its exit status
_RESUMED = re.compile(r"resumed from .* at step ([0-9]+)")
_EXITED = re.compile(r"mmjax\.train exited with status ([0-9]+)")
# A lost slice's run leaves WORKDIR/lock behind; mmjax.train takes it over 600 s after the
# lock's last heartbeat and refuses the workdir (status 1) until then.
_LOCKED = "is in use by another run"
LOCK_WAIT_S = 60.0
LOCK_WAITS = 12


class KeepAlive:
    """``keep-alive``: create, set up, run and follow; after a preemption, again."""

    def __init__(self, args, runner, reader, sleep):
        self.args, self.runner, self.reader, self.sleep = args, runner, reader, sleep
        self.restarts = 0
        self.locked = False  # the last run was refused the workdir's lock
        self.resume_logged = 0  # the last restart whose resumed step was logged

    def say(self, message: str) -> None:
        print(f"tpu.py keep-alive: {message}", file=sys.stderr, flush=True)

    def run_each(self, commands: list[list[str]]) -> tuple[int, list[str] | None]:
        for command in commands:
            print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
            status = self.runner(command)
            if status != 0:
                return status, command
        return 0, None

    def state(self) -> str:
        """The slice's state, or MISSING when ``describe`` fails (the slice is gone)."""
        command = state_command(self.args)
        print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
        status, out = self.reader(command, None)
        if status != 0:
            return "MISSING"
        return out.strip() or "UNKNOWN"

    def bring_up(self) -> str | None:
        """Create the slice (wait until a queued resource is ACTIVE) and set it up: None, or
        what failed."""
        status, command = self.run_each(create_commands(self.args))
        if status:
            return f"{command[0]} exited with status {status}"
        if self.args.queued:
            last = None
            while (state := self.state()) != "ACTIVE":
                if state in ("FAILED", "SUSPENDED", "SUSPENDING", "MISSING"):
                    return f"the queued resource is {state}"
                if state != last:
                    self.say(f"the queued resource is {state}: waiting for ACTIVE")
                    last = state
                self.sleep(self.args.poll_interval)
        status, command = self.run_each(setup_commands(self.args))
        if status:
            return f"{command[0]} exited with status {status}"
        return None

    def follow(self) -> int | None:
        """Follow worker 0's log: the run's exit status, or None when the log ended without
        it (the ssh connection or the VM went away)."""
        seen: dict[str, int] = {}

        def on_line(line: str) -> None:
            print(line, end="", flush=True)
            if "resumed" not in seen and (match := _RESUMED.search(line)):
                seen["resumed"] = int(match.group(1))
                if self.restarts > self.resume_logged:  # once (the log is followed from its
                    self.resume_logged = self.restarts  # start each time)
                    self.say(f"restart {self.restarts}: resumed from step {seen['resumed']}")
            if match := _EXITED.fullmatch(line.strip()):
                seen["exit"] = int(match.group(1))
            if _LOCKED in line:
                self.locked = True

        command = _ssh(self.args, follow_command(), worker="0")
        print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
        self.locked = False
        self.reader(command, on_line)
        if (self.restarts > self.resume_logged and seen.get("exit") in (0, EXIT_PREEMPTED)
                and "resumed" not in seen):
            self.resume_logged = self.restarts
            self.say(f"restart {self.restarts}: no checkpoint to resume from (started at "
                     "step 0)")
        return seen.get("exit")

    def run_once(self) -> tuple[int | None, str, str | None]:
        """Start the run and follow it: its exit status (None if unknown), why it ended, and
        the slice's state if that was checked."""
        status, _ = self.run_each([_ssh(self.args, start_command(self.args))])
        if status:
            return None, f"starting the run failed (ssh exited with status {status})", None
        for _ in range(FOLLOW_TRIES):
            exit_status = self.follow()
            if exit_status is not None:
                return exit_status, f"the run exited with status {exit_status}", None
            state = self.state()
            if state != healthy_state(self.args):
                return None, f"the slice is {state}", state
            self.say(f"worker 0's log ended without an exit status; the slice is {state}: "
                     "following again")
            self.sleep(self.args.poll_interval)
        return (None, f"worker 0's log ended {FOLLOW_TRIES} times without an exit status",
                state)

    def __call__(self) -> int:
        args = self.args
        new_slice = not args.attach
        why = None
        lock_waits = 0
        while True:
            if why is not None:
                self.restarts += 1
                if self.restarts > args.max_restarts:
                    self.say(f"error: {why}; --max-restarts={args.max_restarts} reached (the "
                             "workdir keeps the latest checkpoint: keep-alive --attach, or "
                             "run, resumes)")
                    return EXIT_PREEMPTED
                what = ("delete, create and set up the slice, run again" if new_slice
                        else "run again on the same slice")
                self.say(f"{why}: restart {self.restarts} of at most {args.max_restarts}: "
                         f"{what}")
                if new_slice:
                    status, command = self.run_each(delete_commands(args))
                    if status:
                        self.say(f"delete exited with status {status} (the slice may be gone "
                                 "already); creating it anyway")
            if new_slice:
                failure = self.bring_up()
                if failure and why is None:  # the first slice: a real error, not a preemption
                    print(f"tpu.py keep-alive: error: {failure}", file=sys.stderr)
                    return 1
                if failure:
                    why = f"bringing the slice up again failed: {failure}"
                    self.sleep(args.poll_interval)
                    continue
            exit_status, why, state = self.run_once()
            if exit_status == 0:
                self.say("the run finished (exit status 0)"
                         + (f" after {self.restarts} restart(s)" if self.restarts else ""))
                return 0
            if exit_status == 1 and self.locked and self.restarts and lock_waits < LOCK_WAITS:
                lock_waits += 1
                self.say(f"the workdir is still locked by the lost slice's run (taken over 10 "
                         f"minutes after its last heartbeat): waiting {LOCK_WAIT_S:g} s, then "
                         f"running again ({lock_waits} of at most {LOCK_WAITS})")
                self.sleep(LOCK_WAIT_S)
                why, new_slice = None, False
                continue
            if exit_status not in (None, EXIT_PREEMPTED):
                print(f"tpu.py keep-alive: error: {why} (an error: not retried)",
                      file=sys.stderr)
                return exit_status
            if state is None:  # preempted, or the start failed: is the slice still there?
                state = self.state()
                why = f"{why}; the slice is {state}"
            healthy = state == healthy_state(args)
            if healthy and exit_status is None and why.startswith("starting the run failed"):
                print(f"tpu.py keep-alive: error: {why}", file=sys.stderr)
                return 1
            new_slice = not healthy


def main(argv: Sequence[str] | None = None,
         runner: Callable[[list[str]], int] = subprocess_runner,
         reader: Callable[..., tuple[int, str]] = subprocess_reader,
         sleep: Callable[[float], None] = time.sleep) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    commands = BUILDERS[args.command](args)
    if args.command in ("create", "keep-alive"):
        generation = GENERATIONS[args.generation]
        chips = generation.chips(args.accelerator_type)
        hosts = generation.hosts(args.accelerator_type)
        print(f"# {args.accelerator_type}: {chips} chips on {hosts} host(s)", file=sys.stderr)
    if args.dry_run:
        for command in commands:
            print(command[0] if command[0].startswith("#") else shlex.join(command))
        return 0
    if args.command == "keep-alive":
        try:
            return KeepAlive(args, runner, reader, sleep)()
        except KeyboardInterrupt:
            print("# stopped keeping the run alive; training goes on while the slice lives "
                  "(tpu.py logs follows it, tpu.py stop ends it)", file=sys.stderr)
            return 130
    for command in commands:
        print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
        try:
            status = runner(command)
        except KeyboardInterrupt:
            if args.command in ("run", "logs"):
                print("# stopped following; training goes on (tpu.py logs follows again, "
                      "tpu.py stop ends it)", file=sys.stderr)
            return 130
        if status != 0:
            print(f"tpu.py {args.command}: error: {command[0]} exited with status {status}",
                  file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
