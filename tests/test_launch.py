"""launch/tpu.py: the exact commands of every subcommand's --dry-run, the same argument lists
handed to the runner without it, one-line errors (exit 2) for bad arguments, and the remote
shell snippets (start, follow, stop) run for real with bash against a fake trainer.

No gcloud is ever called: ``main(argv, runner=...)`` gets a recording runner.
"""

import importlib.util
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "launch" / "tpu.py"

_spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
tpu = sys.modules["launch_tpu"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

WHERE = ["--project=my-proj", "--zone=us-central2-b", "--name=mm-v4"]
WHERE_E = ["--project=my-proj", "--zone=us-west4-a", "--name=mm-v5e"]
SUFFIX = "--zone=us-central2-b --project=my-proj"
SUFFIX_E = "--zone=us-west4-a --project=my-proj"
KEEP = ["keep-alive", *WHERE, "--generation=v4", "--accelerator-type=v4-32", "--spot",
        "--repo=https://github.com/me/mmjax.git", "--config=configs/mm_v1_small.py",
        "--workdir=/shared/run", "--poll-interval=0"]

INSTALL = ('cd ~/mmjax && python3 -m pip install --user --quiet uv && '
           '{ [ -x .venv/bin/python ] || ~/.local/bin/uv venv --seed --python 3.11 .venv; } && '
           '.venv/bin/pip install --quiet -e ".[tpu]" && '
           '.venv/bin/python -c "import jax, mmjax; print(jax.__version__)"')
FOLLOW = ('if [ -f ~/mmjax-train.pid ]; then seen="$(mktemp)"; '
          'tail -n +1 -F --pid="$(cat ~/mmjax-train.pid)" ~/mmjax-train.log | tee "$seen"; '
          "for _ in $(seq 50); do grep -q '^mmjax.train exited with status' ~/mmjax-train.log "
          "&& break; sleep 0.1; done; "
          'tail -n +"$(($(wc -l < "$seen") + 1))" ~/mmjax-train.log; rm -f "$seen"; '
          "else tail -n +1 ~/mmjax-train.log; fi")
STOP = ('if [ -f ~/mmjax-train.pid ] && kill -0 "$(cat ~/mmjax-train.pid)" 2>/dev/null; then '
        'kill -TERM "$(cat ~/mmjax-train.pid)" && echo "$(hostname): sent SIGTERM to '
        'mmjax.train (pid $(cat ~/mmjax-train.pid))"; else echo "$(hostname): mmjax.train is '
        'not running"; fi')


def start(train: str) -> str:
    """The remote start command around the quoted ``python -m mmjax.train ...`` words."""
    return ('cd ~/mmjax || exit 1; if [ -f ~/mmjax-train.pid ] && kill -0 '
            '"$(cat ~/mmjax-train.pid)" 2>/dev/null; then echo "$(hostname): mmjax.train is '
            'already running (pid $(cat ~/mmjax-train.pid)); stop it first" >&2; exit 1; fi; '
            f'( trap "" HUP; nohup env PYTHONUNBUFFERED=1 {train} & echo $! > ~/mmjax-train.pid;'
            ' wait $!; echo "mmjax.train exited with status $?" ) > ~/mmjax-train.log 2>&1 '
            '< /dev/null & echo "$(hostname): started mmjax.train (log ~/mmjax-train.log)"')


def ssh(name: str, suffix: str, worker: str, command: str) -> str:
    return (f"gcloud compute tpus tpu-vm ssh {name} {suffix} --worker={worker} "
            + shlex.quote(f"--command={command}"))


def dry_run(capsys, *argv) -> list[str]:
    return dry_run_with_notes(capsys, *argv)[0]


def dry_run_with_notes(capsys, *argv) -> tuple[list[str], str]:
    """The printed commands (stdout) and the notes on stderr."""
    assert tpu.main([argv[0], "--dry-run", *argv[1:]], runner=_no_runner) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def _no_runner(argv):
    raise AssertionError(f"--dry-run ran {argv}")


# ---------------------------------------------------------------------------------------------
# create


@pytest.mark.parametrize("extra, expected", [
    ([], f"gcloud compute tpus tpu-vm create mm-v4 {SUFFIX} --accelerator-type=v4-32 "
         "--version=tpu-ubuntu2204-base"),
    (["--spot"], f"gcloud compute tpus tpu-vm create mm-v4 {SUFFIX} --accelerator-type=v4-32 "
                 "--version=tpu-ubuntu2204-base --spot"),
    (["--queued"], f"gcloud compute tpus queued-resources create mm-v4 {SUFFIX} "
                   "--node-id=mm-v4 --accelerator-type=v4-32 "
                   "--runtime-version=tpu-ubuntu2204-base"),
    (["--queued", "--spot", "--queued-resource-id=qr-1"],
     f"gcloud compute tpus queued-resources create qr-1 {SUFFIX} --node-id=mm-v4 "
     "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot"),
    (["--runtime-version=tpu-ubuntu2204-base-custom"],
     f"gcloud compute tpus tpu-vm create mm-v4 {SUFFIX} --accelerator-type=v4-32 "
     "--version=tpu-ubuntu2204-base-custom"),
])
def test_create_v4(capsys, extra, expected):
    assert dry_run(capsys, "create", *WHERE, "--generation=v4", "--accelerator-type=v4-32",
                   *extra) == [expected]


@pytest.mark.parametrize("extra, expected", [
    ([], f"gcloud compute tpus tpu-vm create mm-v5e {SUFFIX_E} "
         "--accelerator-type=v5litepod-256 --version=v2-alpha-tpuv5-lite"),
    (["--spot"], f"gcloud compute tpus tpu-vm create mm-v5e {SUFFIX_E} "
                 "--accelerator-type=v5litepod-256 --version=v2-alpha-tpuv5-lite --spot"),
    (["--queued", "--spot"], f"gcloud compute tpus queued-resources create mm-v5e {SUFFIX_E} "
                             "--node-id=mm-v5e --accelerator-type=v5litepod-256 "
                             "--runtime-version=v2-alpha-tpuv5-lite --spot"),
])
def test_create_v5e(capsys, extra, expected):
    assert dry_run(capsys, "create", *WHERE_E, "--generation=v5e",
                   "--accelerator-type=v5litepod-256", *extra) == [expected]


def test_create_v5p(capsys):
    assert dry_run(capsys, "create", *WHERE, "--generation=v5p", "--accelerator-type=v5p-128",
                   "--queued") == [
        f"gcloud compute tpus queued-resources create mm-v4 {SUFFIX} --node-id=mm-v4 "
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5"]


@pytest.mark.parametrize("generation, accelerator, chips, hosts", [
    ("v4", "v4-8", 4, 1), ("v4", "v4-32", 16, 4), ("v4", "v4-128", 64, 16),
    ("v5e", "v5litepod-8", 8, 1), ("v5e", "v5litepod-16", 16, 4),
    ("v5e", "v5litepod-256", 256, 64), ("v5p", "v5p-8", 4, 1), ("v5p", "v5p-128", 64, 16),
])
def test_chips_and_hosts(capsys, generation, accelerator, chips, hosts):
    spec = tpu.GENERATIONS[generation]
    assert (spec.chips(accelerator), spec.hosts(accelerator)) == (chips, hosts)
    _, notes = dry_run_with_notes(capsys, "create", *WHERE, f"--generation={generation}",
                                  f"--accelerator-type={accelerator}")
    assert notes == f"# {accelerator}: {chips} chips on {hosts} host(s)\n"


# ---------------------------------------------------------------------------------------------
# setup


def test_setup_copies_head_and_installs(capsys):
    tarball = os.path.join(tempfile.gettempdir(), "mmjax-mm-v4.tar.gz")
    assert dry_run(capsys, "setup", *WHERE) == [
        f"git -C {shlex.quote(str(REPO_ROOT))} archive --format=tar.gz --output={tarball} HEAD",
        f"gcloud compute tpus tpu-vm scp {tarball} mm-v4:mmjax-src.tar.gz {SUFFIX} --worker=all",
        ssh("mm-v4", SUFFIX, "all", "mkdir -p ~/mmjax && tar -xzf ~/mmjax-src.tar.gz -C ~/mmjax"
            f" && {INSTALL}"),
    ]


def test_setup_clones_a_ref(capsys):
    fetch = ("{ [ -d ~/mmjax/.git ] || git clone --quiet https://github.com/me/mmjax.git "
             "~/mmjax; } && git -C ~/mmjax fetch --quiet origin v0.1 && "
             "git -C ~/mmjax checkout --quiet --detach FETCH_HEAD")
    assert dry_run(capsys, "setup", *WHERE_E, "--repo=https://github.com/me/mmjax.git",
                   "--ref=v0.1") == [ssh("mm-v5e", SUFFIX_E, "all", f"{fetch} && {INSTALL}")]


# ---------------------------------------------------------------------------------------------
# run, logs, stop


def test_run_v4_starts_everywhere_then_follows_worker_0(capsys):
    out = dry_run(capsys, "run", *WHERE, "--config=configs/mm_v1_small.py",
                  "--workdir=/mnt/shared/mm-v1", "--", "--config.sharding.mesh=(-1,1,1)",
                  "--config.checkpoint.save_every=1000")
    train = (".venv/bin/python -m mmjax.train --distributed --config=configs/mm_v1_small.py "
             "--workdir=/mnt/shared/mm-v1 '--config.sharding.mesh=(-1,1,1)' "
             "--config.checkpoint.save_every=1000")
    assert out == [ssh("mm-v4", SUFFIX, "all", start(train)), ssh("mm-v4", SUFFIX, "0", FOLLOW)]


def test_run_v5e_gcsfuse_workdir_no_follow(capsys):
    out, notes = dry_run_with_notes(capsys, "run", *WHERE_E,
                                    "--config=configs/mmv2.py:large,finetune",
                                    "--workdir=/gcs/my-bucket/mmv2/large", "--no-follow")
    train = (".venv/bin/python -m mmjax.train --distributed "
             "--config=configs/mmv2.py:large,finetune --workdir=/gcs/my-bucket/mmv2/large")
    assert out == [ssh("mm-v5e", SUFFIX_E, "all", start(train))]
    assert notes == ""


def test_run_takes_a_gs_workdir_as_it_is(capsys):
    out, _ = dry_run_with_notes(capsys, "run", *WHERE_E, "--config=configs/mmv2.py:large",
                                "--workdir=gs://my-bucket/mmv2/large", "--no-follow")
    train = (".venv/bin/python -m mmjax.train --distributed "
             "--config=configs/mmv2.py:large --workdir=gs://my-bucket/mmv2/large")
    assert out == [ssh("mm-v5e", SUFFIX_E, "all", start(train))]


OVERRIDES = ["--config.data.corpus=it's \"quoted\" $HOME `x` a  b",
             "--config.model.name=memory mosaic; rm -rf ~",
             "--config.sharding.mesh=(1, -1, 1)"]


def test_run_quotes_overrides_for_both_shells(capsys):
    """Overrides with spaces, quotes, $ and ; reach mmjax.train as the same argv words, after
    the local shell (pasting the printed line) and the remote shell (--command) split them."""
    out = dry_run(capsys, "run", *WHERE, "--config=configs/mm_v1_small.py:tiny",
                  "--workdir=/shared/run 1", "--no-follow", "--", *OVERRIDES)
    assert len(out) == 1
    argv = shlex.split(out[0])  # what the local shell hands gcloud
    command = argv[-1].removeprefix("--command=")
    assert argv[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mm-v4",
                         "--zone=us-central2-b", "--project=my-proj", "--worker=all"]
    train = command.split("nohup env PYTHONUNBUFFERED=1 ", 1)[1].split(" & echo $!", 1)[0]
    assert shlex.split(train) == [
        ".venv/bin/python", "-m", "mmjax.train", "--distributed",
        "--config=configs/mm_v1_small.py:tiny", "--workdir=/shared/run 1", *OVERRIDES]


def test_logs_and_stop(capsys):
    assert dry_run(capsys, "logs", *WHERE) == [ssh("mm-v4", SUFFIX, "0", FOLLOW)]
    assert dry_run(capsys, "logs", *WHERE_E, "--worker=63") == [
        ssh("mm-v5e", SUFFIX_E, "63", FOLLOW)]
    assert dry_run(capsys, "stop", *WHERE_E) == [ssh("mm-v5e", SUFFIX_E, "all", STOP)]
    assert dry_run(capsys, "stop", *WHERE, "--kill") == [
        ssh("mm-v4", SUFFIX, "all", STOP.replace("-TERM", "-KILL").replace("SIGTERM", "SIGKILL"))]


# ---------------------------------------------------------------------------------------------
# delete, status


@pytest.mark.parametrize("subcommand, extra, expected", [
    ("delete", [], f"gcloud compute tpus tpu-vm delete mm-v4 {SUFFIX} --quiet"),
    ("delete", ["--queued"],
     f"gcloud compute tpus queued-resources delete mm-v4 {SUFFIX} --force --quiet"),
    ("delete", ["--queued", "--queued-resource-id=qr-1"],
     f"gcloud compute tpus queued-resources delete qr-1 {SUFFIX} --force --quiet"),
    ("status", [], f"gcloud compute tpus tpu-vm describe mm-v4 {SUFFIX}"),
    ("status", ["--queued"], f"gcloud compute tpus queued-resources describe mm-v4 {SUFFIX}"),
])
def test_delete_and_status(capsys, subcommand, extra, expected):
    assert dry_run(capsys, subcommand, *WHERE, *extra) == [expected]


# ---------------------------------------------------------------------------------------------
# Without --dry-run: the runner gets the same argument lists.

RUNS = [
    ["create", *WHERE, "--generation=v4", "--accelerator-type=v4-32", "--spot"],
    ["create", *WHERE_E, "--generation=v5e", "--accelerator-type=v5litepod-256", "--queued"],
    ["setup", *WHERE],
    ["run", *WHERE_E, "--config=configs/mmv2.py:large", "--workdir=/shared/x", "--",
     *OVERRIDES],
    ["logs", *WHERE], ["stop", *WHERE], ["stop", *WHERE, "--kill"],
    ["delete", *WHERE_E, "--queued"], ["status", *WHERE],
]


@pytest.mark.parametrize("argv", RUNS, ids=lambda a: a[0])
def test_without_dry_run_the_runner_gets_the_printed_commands(capsys, argv):
    printed = [shlex.split(line) for line in dry_run(capsys, *argv)]
    calls = []
    assert tpu.main(argv, runner=lambda command: calls.append(command) or 0) == 0
    assert calls == printed and calls
    assert all(isinstance(word, str) for call in calls for word in call)


def test_the_first_failing_command_stops_the_rest(capsys):
    calls = []
    status = tpu.main(["setup", *WHERE], runner=lambda command: calls.append(command) or 3)
    assert status == 3 and len(calls) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tpu.py setup: error: git exited with status 3")


def test_ctrl_c_while_following_leaves_the_run_alone(capsys):
    def runner(command):
        if "--worker=0" in command:
            raise KeyboardInterrupt
        return 0

    argv = ["run", *WHERE, "--config=configs/mm_v1_small.py", "--workdir=/shared/x"]
    assert tpu.main(argv, runner=runner) == 130
    assert "training goes on" in capsys.readouterr().err


def test_the_script_runs_from_a_shell():
    out = subprocess.run([sys.executable, str(SCRIPT), "delete", *WHERE, "--dry-run"],
                         capture_output=True, text=True, cwd="/")
    assert (out.returncode, out.stdout) == (
        0, f"gcloud compute tpus tpu-vm delete mm-v4 {SUFFIX} --quiet\n")


# ---------------------------------------------------------------------------------------------
# Bad arguments: one line on stderr, exit 2.


@pytest.mark.parametrize("argv, message", [
    (["create", *WHERE, "--generation=v3", "--accelerator-type=v3-8"],
     "tpu.py create: error: unknown generation 'v3': v4, v5e or v5p"),
    (["create", *WHERE, "--generation=v5e", "--accelerator-type=v4-32"],
     "tpu.py create: error: accelerator type 'v4-32' is not a v5e slice "
     "(v5litepod-N, e.g. v5litepod-256)"),
    (["create", *WHERE, "--generation=v4", "--accelerator-type=v5p-128"],
     "tpu.py create: error: accelerator type 'v5p-128' is not a v4 slice (v4-N, e.g. v4-32)"),
    (["create", *WHERE, "--generation=v4", "--accelerator-type=v4-12"],
     "tpu.py create: error: accelerator type 'v4-12': v4 slices count TensorCores in "
     "multiples of 8 (e.g. v4-32)"),
    (["create", *WHERE, "--generation=v5e", "--accelerator-type=v5litepod-512"],
     "tpu.py create: error: accelerator type 'v5litepod-512': v5e slices are v5litepod-1, "
     "v5litepod-4, v5litepod-8, v5litepod-16, v5litepod-32, v5litepod-64, v5litepod-128, "
     "v5litepod-256"),
    (["create", "--zone=z", "--name=n", "--generation=v4", "--accelerator-type=v4-8"],
     "tpu.py create: error: the following arguments are required: --project"),
    (["stop", "--project=p", "--name=n"],
     "tpu.py stop: error: the following arguments are required: --zone"),
    (["delete", "--project=", "--zone=z", "--name=n"], "tpu.py delete: error: --project is empty"),
    (["stop", "--project=p", "--zone=z", "--name=My_TPU"],
     "tpu.py stop: error: --name 'My_TPU': lowercase letters, digits and '-', starting with a "
     "letter, at most 63 characters"),
    (["create", *WHERE, "--generation=v4", "--accelerator-type=v4-8",
      "--queued-resource-id=q"], "tpu.py create: error: --queued-resource-id needs --queued"),
    (["run", *WHERE, "--config=configs/mm_v1_small.py", "--workdir=runs/x"],
     "tpu.py run: error: --workdir 'runs/x' must be an absolute path that all workers share"),
    (["run", *WHERE, "--config=configs/mm_v1_small.py", "--workdir=~/runs"],
     "tpu.py run: error: --workdir '~/runs' must be an absolute path that all workers share"),
    (["run", *WHERE, "--config=configs/mm_v1_small.py", "--workdir=s3://b/x"],
     "tpu.py run: error: --workdir 's3://b/x': only gs://BUCKET/PATH URLs or an absolute path "
     "that all workers share (launch/README.md)"),
    (["run", *WHERE, "--config=configs/mm_v1_small.py", "--workdir=gs://b"],
     "tpu.py run: error: --workdir 'gs://b': a gs:// workdir needs a bucket and a path in it "
     "(gs://BUCKET/PATH)"),
    (["run", *WHERE, "--config=configs/nope.py:tiny", "--workdir=/x"],
     "tpu.py run: error: --config 'configs/nope.py:tiny': no file 'configs/nope.py' in the "
     "repository (give a path relative to its root, e.g. configs/mm_v1_small.py)"),
    (["run", *WHERE, "--config=configs/mm_v1_small.py", "--workdir=/x", "--", "--seed=1"],
     "tpu.py run: error: override '--seed=1' is not --config.KEY=VALUE"),
    (["run", *WHERE, "--config=configs/mm_v1_small.py", "--workdir=/x", "--",
      "--config.train.seed", "1"],
     "tpu.py run: error: override '--config.train.seed' is not --config.KEY=VALUE"),
    (["stop", *WHERE, "--", "--config.train.seed=1"],
     "tpu.py stop: error: arguments after -- are config overrides, for run and keep-alive "
     "only: ['--config.train.seed=1']"),
    (KEEP + ["--max-restarts=-1"], "tpu.py keep-alive: error: --max-restarts -1: must be >= 0"),
    (KEEP + ["--poll-interval=-5"], "tpu.py keep-alive: error: --poll-interval -5: must be >= 0"),
    (KEEP[:5] + KEEP[6:], "tpu.py keep-alive: error: the following arguments are required: "
                          "--accelerator-type"),
    (KEEP + ["--ref="], "tpu.py keep-alive: error: --ref is empty"),
    (KEEP + ["--workdir=rel"], "tpu.py keep-alive: error: --workdir 'rel' must be an absolute "
                               "path that all workers share"),
    (KEEP + ["--", "--seed=1"], "tpu.py keep-alive: error: override '--seed=1' is not "
                                "--config.KEY=VALUE"),
])
def test_bad_arguments_give_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tpu.main([argv[0], "--dry-run", *argv[1:]], runner=_no_runner)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", message + "\n")


def test_an_unknown_subcommand_gives_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tpu.main(["launch", *WHERE], runner=_no_runner)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tpu.py: error: argument command: invalid choice: 'launch'")
    assert err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# The remote snippets, run with bash in a fake worker home against a fake trainer.

FAKE_TRAINER = """#!/bin/bash
printf '%s\\0' "$@" > "$HOME/argv"
trap 'echo "SIGTERM: saved step 7 and stopping"; exit 0' TERM
echo "train: step 1"
while :; do sleep 0.05; done
"""


def _bash(command: str, home: pathlib.Path, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": str(home)},
                          capture_output=True, text=True, timeout=timeout)


def _wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="GNU tail and /proc, as on a TPU VM")
def test_remote_start_follow_stop_with_bash(tmp_path):
    home = tmp_path / "home"
    fake = home / "mmjax" / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    args = tpu.parse_args(["run", *WHERE, "--config=configs/mm_v1_small.py",
                           "--workdir=/shared/run 1", "--", *OVERRIDES])
    pid = None
    try:
        started = _bash(tpu.start_command(args), home)
        assert started.returncode == 0, started.stderr
        assert started.stdout.endswith(": started mmjax.train (log ~/mmjax-train.log)\n")
        _wait_for(lambda: (home / "argv").exists() and (home / "mmjax-train.pid").exists())
        _wait_for(lambda: (home / "argv").read_bytes().endswith(b"\0"))
        assert (home / "argv").read_bytes().split(b"\0")[:-1] == [
            w.encode() for w in ["-m", "mmjax.train", "--distributed",
                                 "--config=configs/mm_v1_small.py", "--workdir=/shared/run 1",
                                 *OVERRIDES]]
        pid = int((home / "mmjax-train.pid").read_text())

        again = _bash(tpu.start_command(args), home)  # refused while the first one lives
        assert again.returncode == 1
        assert again.stderr.endswith(f"mmjax.train is already running (pid {pid}); "
                                     "stop it first\n")

        os.kill(pid, signal.SIGHUP)  # what a dropped ssh connection sends
        time.sleep(0.3)
        assert _alive(pid)

        stopped = _bash(tpu.stop_command(), home)
        assert stopped.stdout.endswith(f": sent SIGTERM to mmjax.train (pid {pid})\n")
        followed = _bash(tpu.follow_command(), home)  # returns once the trainer has exited
        assert followed.stdout == ("train: step 1\nSIGTERM: saved step 7 and stopping\n"
                                   "mmjax.train exited with status 0\n")
        assert not _alive(pid)
        assert _bash(tpu.stop_command(), home).stdout.endswith(": mmjax.train is not running\n")
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="GNU tail, as on a TPU VM")
def test_follow_waits_for_the_exit_status_written_after_the_trainer_died(tmp_path):
    """The trainer is gone (tail --pid returns at once) but the shell around it appends the
    exit status a moment later: the follower still ends with that line, each line once."""
    home = tmp_path / "home"
    home.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (home / "mmjax-train.pid").write_text(f"{dead.pid}\n")
    log = home / "mmjax-train.log"
    log.write_text("train: step 1\nSIGTERM: saved step 7 and stopping\n")
    late = subprocess.Popen(["bash", "-c", f"sleep 1; echo 'mmjax.train exited with status 3' "
                             f">> '{log}'"])
    try:
        followed = _bash(tpu.follow_command(), home)
    finally:
        late.wait()
    assert followed.stdout == ("train: step 1\nSIGTERM: saved step 7 and stopping\n"
                               "mmjax.train exited with status 3\n")


@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="needs a git checkout")
def test_setup_copy_ships_the_committed_tree(tmp_path):
    """The printed git archive command, then the remote unpack, give ~/mmjax the tracked files
    of HEAD (setup.cfg, launch/tpu.py) and no untracked ones (.venv)."""
    name = f"t{os.getpid()}"
    archive = tpu.setup_commands(tpu.parse_args(["setup", *WHERE[:2], f"--name={name}"]))[0]
    tarball = pathlib.Path(tpu.local_tarball(name))
    try:
        subprocess.run(archive, check=True, capture_output=True)
        home = tmp_path / "home"
        home.mkdir()
        tarball.rename(home / tpu.REMOTE_TARBALL)
    finally:
        tarball.unlink(missing_ok=True)
    unpacked = _bash(tpu.unpack_command(), home)
    assert unpacked.returncode == 0, unpacked.stderr
    code = home / "mmjax"
    assert (code / "setup.cfg").is_file() and (code / "launch" / "tpu.py").is_file()
    assert not (code / ".venv").exists()


# ---------------------------------------------------------------------------------------------
# keep-alive, against a fake gcloud first on PATH

FAKE_GCLOUD = """#!{python}
# A fake gcloud: records each call in calls.txt and plays the runs of runs.json, one per
# follow of worker 0's log. The slice's state is in state.txt (MISSING: describe fails).
import json, pathlib, sys
here = pathlib.Path({here!r})
argv = sys.argv[1:]
state_file = here / "state.txt"
state = state_file.read_text() if state_file.exists() else "MISSING"
queued = argv[2] == "queued-resources"
group, verb = argv[2], argv[3]
if verb == "ssh":
    command = next(a for a in argv if a.startswith("--command="))
    worker = next(a for a in argv if a.startswith("--worker="))
    verb = ("setup" if "pip install" in command else "start" if "nohup" in command
            else "follow" if worker == "--worker=0" and "tail" in command else "other")
with open(here / "calls.txt", "a") as calls:
    calls.write(f"{{group}} {{verb}}\\n")
if state == "MISSING" and verb not in ("create", "delete"):
    print("ERROR: (gcloud) NOT_FOUND: the slice does not exist", file=sys.stderr)
    sys.exit(1)
if verb == "create":
    state_file.write_text("WAITING_FOR_RESOURCES" if queued else "READY")
elif verb == "delete":
    if state == "MISSING":
        print("ERROR: (gcloud) NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    state_file.write_text("MISSING")
elif verb == "describe":
    assert argv[-1] == ("--format=value(state.state)" if queued else "--format=value(state)")
    print(state)
    if state == "WAITING_FOR_RESOURCES":
        state_file.write_text("ACTIVE")
elif verb == "follow":
    runs = json.loads((here / "runs.json").read_text())
    run, rest = runs[0], runs[1:] or runs  # the last run repeats
    (here / "runs.json").write_text(json.dumps(rest))
    for line in run["lines"]:
        print(line, flush=True)
    if run.get("state"):
        state_file.write_text(run["state"])
    sys.exit(run.get("ssh", 0))
"""

STEPS = ["step 1: loss 2.5", "step 2: loss 2.4"]
PREEMPTED = {"lines": [*STEPS, "SIGTERM: saved step 40 and stopping (exit status 3)",
                       "mmjax.train exited with status 3"], "state": "PREEMPTED"}
RESUMED = {"lines": ["resumed from /shared/run/checkpoints at step 40", "step 41: loss 2.0",
                     "mmjax.train exited with status 0"]}


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
    """Write the fake gcloud; returns a function that sets its runs and reads its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable, here=str(tmp_path)))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def play(*runs, state=None):
        (tmp_path / "runs.json").write_text(json.dumps(list(runs)))
        if state:
            (tmp_path / "state.txt").write_text(state)
        return lambda: (tmp_path / "calls.txt").read_text().splitlines()

    return play


def test_keep_alive_recreates_a_preempted_slice_and_resumes(gcloud, capsys):
    calls = gcloud(PREEMPTED, RESUMED)
    assert tpu.main(KEEP) == 0
    assert calls() == ["tpu-vm create", "tpu-vm setup", "tpu-vm start", "tpu-vm follow",
                       "tpu-vm describe", "tpu-vm delete",
                       "tpu-vm create", "tpu-vm setup", "tpu-vm start", "tpu-vm follow"]
    out, err = capsys.readouterr()
    assert out.splitlines() == [*PREEMPTED["lines"], *RESUMED["lines"]]  # worker 0's log
    notes = [line for line in err.splitlines() if line.startswith("tpu.py keep-alive:")]
    assert notes == [
        "tpu.py keep-alive: the run exited with status 3; the slice is PREEMPTED: restart 1 of "
        "at most 10: delete, create and set up the slice, run again",
        "tpu.py keep-alive: restart 1: resumed from step 40",
        "tpu.py keep-alive: the run finished (exit status 0) after 1 restart(s)"]


def test_keep_alive_when_the_vms_are_gone(gcloud, capsys):
    """ssh fails (the VMs are gone, no exit status in the log) and describe finds no slice:
    a queued resource is deleted, requested again, waited for and set up."""
    lost = {"lines": STEPS, "ssh": 255, "state": "MISSING"}
    calls = gcloud(lost, RESUMED)
    assert tpu.main([*KEEP, "--queued"]) == 0
    qr = "queued-resources"
    assert calls() == [f"{qr} create", f"{qr} describe", f"{qr} describe", "tpu-vm setup",
                       "tpu-vm start", "tpu-vm follow", f"{qr} describe", f"{qr} delete",
                       f"{qr} create", f"{qr} describe", f"{qr} describe", "tpu-vm setup",
                       "tpu-vm start", "tpu-vm follow"]
    err = capsys.readouterr().err
    assert ("tpu.py keep-alive: the queued resource is WAITING_FOR_RESOURCES: waiting for "
            "ACTIVE") in err
    assert ("tpu.py keep-alive: the slice is MISSING: restart 1 of at most 10: delete, "
            "create and set up the slice, run again") in err
    assert "tpu.py keep-alive: delete exited with status 1 (the slice may be gone" in err
    assert "tpu.py keep-alive: restart 1: resumed from step 40" in err


def test_keep_alive_stops_at_max_restarts(gcloud, capsys):
    calls = gcloud(PREEMPTED)  # always preempted
    assert tpu.main([*KEEP, "--max-restarts=2"]) == 3
    assert calls().count("tpu-vm create") == 3 and calls().count("tpu-vm follow") == 3
    assert calls()[-3:] == ["tpu-vm start", "tpu-vm follow", "tpu-vm describe"]
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "tpu.py keep-alive: error: the run exited with status 3; the slice is PREEMPTED; "
        "--max-restarts=2 reached (the workdir keeps the latest checkpoint: keep-alive "
        "--attach, or run, resumes)")
    assert "restart 2 of at most 2" in err


@pytest.mark.parametrize("status", [1, 2])
def test_keep_alive_does_not_retry_an_error(gcloud, capsys, status):
    calls = gcloud({"lines": [*STEPS, f"mmjax.train exited with status {status}"]})
    assert tpu.main(KEEP) == status
    assert calls() == ["tpu-vm create", "tpu-vm setup", "tpu-vm start", "tpu-vm follow"]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"tpu.py keep-alive: error: the run exited with status {status} (an error: not "
        "retried)")


def test_keep_alive_reruns_on_a_slice_that_is_still_there(gcloud, capsys):
    """Exit 3 with the slice READY (SIGTERM without a preemption): run again on it. A dropped
    ssh connection with the slice READY: follow the same run again."""
    stopped = {"lines": [*STEPS, "mmjax.train exited with status 3"]}
    dropped = {"lines": ["resumed from /shared/run/checkpoints at step 2"], "ssh": 255}
    again = {"lines": [*dropped["lines"], "mmjax.train exited with status 0"]}
    calls = gcloud(stopped, dropped, again, state="READY")
    assert tpu.main([*KEEP, "--attach"]) == 0
    assert calls() == ["tpu-vm start", "tpu-vm follow", "tpu-vm describe",
                       "tpu-vm start", "tpu-vm follow", "tpu-vm describe", "tpu-vm follow"]
    err = capsys.readouterr().err
    assert ("tpu.py keep-alive: the run exited with status 3; the slice is READY: restart 1 "
            "of at most 10: run again on the same slice") in err
    assert err.count("tpu.py keep-alive: restart 1: resumed from step 2") == 1  # followed twice
    assert ("tpu.py keep-alive: worker 0's log ended without an exit status; the slice is "
            "READY: following again") in err


def test_keep_alive_first_slice_failure_is_an_error(capsys):
    calls = []
    assert tpu.main(KEEP, runner=lambda command: calls.append(command) or 1) == 1
    assert len(calls) == 1 and calls[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tpu.py keep-alive: error: gcloud exited with status 1")


def test_keep_alive_retries_a_failed_recreation(gcloud, capsys, tmp_path):
    """After a preemption the new slice cannot be created at first (no capacity): that
    counts as a restart, and the next one succeeds."""
    calls = gcloud(PREEMPTED, RESUMED)
    failures = iter([0, 1, 0])  # the first create works, the second fails

    def runner(command):
        if command[3:5] == ["tpu-vm", "create"] and next(failures):
            return 1
        return tpu.subprocess_runner(command)

    assert tpu.main(KEEP, runner=runner) == 0
    assert calls() == ["tpu-vm create", "tpu-vm setup", "tpu-vm start", "tpu-vm follow",
                       "tpu-vm describe", "tpu-vm delete",
                       "tpu-vm delete", "tpu-vm create", "tpu-vm setup", "tpu-vm start",
                       "tpu-vm follow"]
    err = capsys.readouterr().err
    assert ("tpu.py keep-alive: bringing the slice up again failed: gcloud exited with status "
            "1: restart 2 of at most 10: delete, create and set up the slice, run again") in err
    assert "tpu.py keep-alive: restart 2: resumed from step 40" in err


def test_keep_alive_dry_run(capsys):
    train = ".venv/bin/python -m mmjax.train --distributed --config=configs/mm_v1_small.py " \
            "--workdir=/shared/run --config.train.seed=2"
    fetch = ("{ [ -d ~/mmjax/.git ] || git clone --quiet https://github.com/me/mmjax.git "
             "~/mmjax; } && git -C ~/mmjax fetch --quiet origin main && "
             "git -C ~/mmjax checkout --quiet --detach FETCH_HEAD")
    out = dry_run(capsys, *KEEP, "--queued", "--max-restarts=4", "--",
                  "--config.train.seed=2")
    describe = (f"gcloud compute tpus queued-resources describe mm-v4 {SUFFIX} "
                "'--format=value(state.state)'")
    assert out == [
        f"gcloud compute tpus queued-resources create mm-v4 {SUFFIX} --node-id=mm-v4 "
        "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot",
        "# wait until its state is ACTIVE:", describe,
        ssh("mm-v4", SUFFIX, "all", f"{fetch} && {INSTALL}"),
        ssh("mm-v4", SUFFIX, "all", start(train)), ssh("mm-v4", SUFFIX, "0", FOLLOW),
        "# on exit status 3 or a lost slice (at most --max-restarts=4 times):", describe,
        "# if it is not ACTIVE: delete, create and set up again",
        f"gcloud compute tpus queued-resources delete mm-v4 {SUFFIX} --force --quiet",
        "# then run and follow again, as above"]
    attached = dry_run(capsys, *KEEP, "--attach")
    assert attached[:2] == [ssh("mm-v4", SUFFIX, "all", start(train.rsplit(" ", 1)[0])),
                            ssh("mm-v4", SUFFIX, "0", FOLLOW)]
    assert attached[3] == f"gcloud compute tpus tpu-vm describe mm-v4 {SUFFIX} " \
                          "'--format=value(state)'"


def test_keep_alive_waits_for_the_lost_runs_lock(gcloud, capsys):
    """A slice lost without a clean exit leaves WORKDIR/lock behind: the new slice's run is
    refused (status 1) until mmjax.train takes the stale lock over; keep-alive waits and runs
    again on the new slice, without counting a restart."""
    lost = {"lines": STEPS, "ssh": 255, "state": "MISSING"}
    locked = {"lines": ["error: workdir /shared/run is in use by another run: lock file "
                        "/shared/run/lock held by t1v-0 pid 7 (...)",
                        "mmjax.train exited with status 1"]}
    calls = gcloud(lost, locked, RESUMED)
    slept = []
    assert tpu.main([*KEEP, "--max-restarts=1"], sleep=slept.append) == 0
    assert calls()[-6:] == ["tpu-vm create", "tpu-vm setup", "tpu-vm start", "tpu-vm follow",
                            "tpu-vm start", "tpu-vm follow"]
    assert slept == [tpu.LOCK_WAIT_S]
    err = capsys.readouterr().err
    assert ("tpu.py keep-alive: the workdir is still locked by the lost slice's run (taken "
            "over 10 minutes after its last heartbeat): waiting 60 s, then running again "
            "(1 of at most 12)") in err
    assert "tpu.py keep-alive: restart 1: resumed from step 40" in err


def test_keep_alive_says_when_a_restart_had_no_checkpoint(gcloud, capsys):
    calls = gcloud(PREEMPTED, {"lines": [*STEPS, "mmjax.train exited with status 0"]})
    assert tpu.main(KEEP) == 0
    assert calls().count("tpu-vm create") == 2
    assert ("tpu.py keep-alive: restart 1: no checkpoint to resume from (started at step 0)"
            in capsys.readouterr().err)
