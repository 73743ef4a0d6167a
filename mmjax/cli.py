"""The command-line convention of every ``python -m mmjax.*`` command: errors and exit statuses.

Exit statuses (:data:`EXIT_OK`, :data:`EXIT_ERROR`, :data:`EXIT_USAGE`, :data:`EXIT_PREEMPTED`):

- 0: done;
- 1: an error: bad input, a missing or corrupt file, a run that failed;
- 2: a bad command line: an unknown or missing flag, a flag value rejected before running;
- 3: preempted (``python -m mmjax.train``: SIGTERM stopped the run after saving a
  checkpoint; the same command resumes).

A user's mistake is one line on stderr, ``error: ...``, never a traceback: a command's body
runs under :func:`run`, which prints :data:`USER_ERRORS` as that line and returns their
status (:class:`UsageError`: 2, the others: 1). Any other exception is a bug and keeps its
traceback; ``MMJAX_TRACEBACK=1`` shows the traceback of a user error too.

Two parsers, both through here:

- absl for the config-driven commands (``mmjax.train``, ``mmjax.moons``, ``mmjax.flops``,
  ``mmjax.aot``): their ``--config FILE.py[:presets]`` flag with ``--config.KEY=VALUE``
  overrides is ml_collections' config flag, an absl flag. :func:`run_absl` parses them; a
  flag absl rejects or an unknown config key is a usage error, ``--help`` exits 0.
- argparse for the others (``mmjax.data.prepare``, ``mmjax.data.tokenizer``,
  ``mmjax.generate``, ``mmjax.eval``, ``mmjax.kernels.compile_check``): plain flags and
  subcommands, no config. :class:`ArgumentParser` prints its errors as the one line.

This module imports nothing from mmjax (nor jax), so that every module may use it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 3

# Set (to anything) to see the traceback of a user error instead of its one line.
TRACEBACK_VARIABLE = "MMJAX_TRACEBACK"


class Error(Exception):
    """A user's mistake or a failed run that no built-in exception names: exit status 1."""

    status = EXIT_ERROR


class UsageError(Error):
    """A bad command line (flag, flag value, argument): exit status 2."""

    status = EXIT_USAGE


# What a command reports in one line rather than as a traceback: bad values (DataError is a
# ValueError), failed runs (JAX's runtime errors, a non-finite loss), missing files.
USER_ERRORS = (Error, ValueError, RuntimeError, OSError)

Argv = Sequence[str] | None


def one_line(message: str) -> str:
    """``message`` on one line: a traceback quoted in it (ml_collections quotes a config
    file's) shrinks to its last line; lines are joined with a space after a colon, else
    with ``"; "`` (``"invalid config:\\n  a\\n  b"`` -> ``"invalid config: a; b"``)."""
    head, quoted, tail = message.partition("Traceback (most recent call last):")
    lines = [line.strip() for line in head.splitlines() if line.strip()]
    if quoted:
        lines += [line.strip() for line in tail.splitlines() if line.strip()][-1:]
    text = ""
    for line in lines:
        text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text


def status_of(error: BaseException) -> int:
    """The exit status of a user error: 2 for a :class:`UsageError`, else 1."""
    return getattr(error, "status", EXIT_ERROR)


def report(error: BaseException) -> int:
    """Print ``error: MESSAGE`` (one line) on stderr; return the error's exit status."""
    sys.stdout.flush()
    print(f"error: {one_line(str(error)) or type(error).__name__}", file=sys.stderr,
          flush=True)
    return status_of(error)


def run(command: Callable[[Argv], int | None], argv: Argv = None) -> int:
    """The exit status of ``command(argv)``: what it returns (``None``: 0), or a user error's
    status after its one line (:func:`report`). ``SystemExit`` (argparse's ``--help`` and
    errors) passes through."""
    try:
        status = command(argv)
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        return report(error)
    return EXIT_OK if status is None else int(status)


def command(main: Callable[[Argv], int | None]) -> Callable[[Argv], int]:
    """Decorator: ``main(argv=None)`` run by :func:`run` (an argparse command's entry point:
    ``sys.exit(main())``, or ``main([...])`` from Python for its status)."""

    @functools.wraps(main)
    def wrapped(argv: Argv = None) -> int:
        return run(main, argv)

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the one line of :func:`report` and exit status 2 (a
    ``SystemExit``, as argparse's own); subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        sys.exit(report(UsageError(message)))


def _config_overrides(argv: Sequence[str]) -> list[str]:
    """The ``--NAME.KEY=VALUE`` arguments of ``argv`` (config flag overrides)."""
    return [a for a in argv[1:] if a.startswith("--") and "." in a.partition("=")[0]]


@contextlib.contextmanager
def _absl_flag_errors(argv: Sequence[str]) -> Iterator[None]:
    """absl's flag definition and parsing, with usage errors as one line and exit status 2,
    and ``--help`` (absl exits 1 after printing it) exiting 0."""
    from absl import flags

    try:
        yield
    except flags.Error as error:
        sys.exit(report(UsageError(str(error))))
    except (AttributeError, KeyError) as error:
        # ml_collections' config flag raises these for an override of a key the config lacks
        overrides = _config_overrides(argv)
        if not overrides:
            raise
        sys.exit(report(UsageError(f"unknown config key in {' '.join(overrides)}: "
                                   f"{str(error).strip(chr(34))}")))
    except SystemExit as done:
        # only the help flags (--help, --helpshort, --helpfull, --helpxml) exit while parsing
        sys.exit(EXIT_OK if done.code == 1 else done.code)


def run_absl(main: Callable[[], int | None], define_flags: Callable[[], None] | None = None,
             argv: Argv = None) -> NoReturn:
    """Run an absl command and exit: ``define_flags()``, parse ``argv`` (default
    ``sys.argv``) into ``absl.flags.FLAGS``, then ``main()`` under :func:`run`. Arguments
    that are not flags are a usage error."""
    from absl import app, flags

    argv = list(sys.argv if argv is None else argv)
    if define_flags is not None:
        with _absl_flag_errors(argv):
            define_flags()

    def parse(args: list[str]) -> list[str]:
        with _absl_flag_errors(args):
            return flags.FLAGS(args)

    def body(args: Argv) -> int | None:
        if len(args) > 1:
            raise UsageError(f"unexpected arguments: {' '.join(args[1:])}")
        return main()

    app.run(lambda args: run(body, args), argv=argv, flags_parser=parse)
    raise AssertionError("absl.app.run returned")  # it always exits
