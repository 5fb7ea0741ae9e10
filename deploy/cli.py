"""`fedcompose`: one command, with a subcommand per job.

Each subcommand lives in its own module with a `DESCRIPTION` and
`run(config) -> int`; its flags, `--help` and validation come from the one
declaration of every setting (`shared.config`). Modules are imported only
when their subcommand runs, so `fedcompose worker` never pays for importing
TensorFlow. This is also the one
place where errors become what the user sees: a `FedcomposeError` (or an
`OSError` that escaped) is one line on stderr and its exit code
(`shared.errors.EXIT_CODES`), an interrupt is `INTERRUPTED`.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import signal
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "deploy.local",
        "start workers and coordinator on this machine and train (the default job)",
    ),
    "worker": ("client_worker.cli", "serve one shard of clients (TFF executor service)"),
    "train": ("coordinator.cli", "train over workers that are already running"),
    "data": ("deploy.data.cli", "build worker shards from a federated dataset"),
    "status": ("deploy.status", "show whether workers are up and what they host"),
    "provision": ("deploy.provision", "create a federation's CA and a TLS kit per site"),
    "bench": ("deploy.bench.cli", "measure where a round's time goes, against baselines"),
    "blocks": ("deploy.blocks", "list the algorithm's building blocks and their settings"),
    "compare": ("deploy.compare", "draw several runs' held-out curves in one picture"),
}


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:
        from shared import exit_guard

        exit_guard.arm(code)
    return code


def _main(argv: list[str] | None) -> int:
    if argv is None:  # the program itself, not a caller in its own process (a test)
        from shared import scratch

        # Before anything imports TensorFlow, which writes a module per converted
        # function to the temporary directory and leaves them there when killed.
        scratch.private_tempdir()
        # `kill -USR1 PID` prints every thread's stack: what a process that
        # seems stuck is doing, without stopping it.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    argv = sys.argv[1:] if argv is None else argv
    # Before anything imports TensorFlow: its C++ log level is read once, at load.
    from shared.quiet import quiet_tensorflow

    quiet_tensorflow(verbose="--verbose" in argv)
    from shared.errors import UsageError

    parser = top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else UsageError.exit_code
    name = argv[0]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}")
    from shared import config

    module = importlib.import_module(SUBCOMMANDS[name][0])
    args = command_parser(name, module.DESCRIPTION).parse_args(argv[1:])
    return run_reporting(name, lambda: module.run(config.resolve(args, name)))


def top_parser() -> argparse.ArgumentParser:
    """`fedcompose`'s own parser: the subcommands and the exit codes."""
    from shared.errors import EXIT_CODES

    parser = argparse.ArgumentParser(
        prog="fedcompose",
        description="A multi-process federated-learning simulator on TFF's remote executors.",
        epilog="Exit codes: "
        + ", ".join(f"{c.code} {c.kind}" for c in EXIT_CODES)
        + ". `fedcompose COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of `fedcompose NAME`: a flag per setting the command takes
    (`shared.config`); the documentation's CLI reference is made from it too."""
    from shared import config

    parser = argparse.ArgumentParser(prog=f"fedcompose {name}", description=description)
    config.add_arguments(parser, name)
    return parser


def run_reporting(name: str, body) -> int:
    """Runs a command's body; every error it raises becomes one line and an exit code."""
    from shared import interrupts, logs
    from shared.errors import FAILURE, INTERRUPTED, FedcomposeError, describe_os_error

    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        return _report(name, "interrupted", INTERRUPTED, logs)
    except Exception as e:
        logging.getLogger("fedcompose").debug("details", exc_info=True)
        if interrupts.requested():  # the interrupt surfaced as another error
            return _report(name, "interrupted", INTERRUPTED, logs)
        if isinstance(e, FedcomposeError):
            return _report(name, f"error: {e}", e.exit_code, logs)
        if isinstance(e, OSError):
            return _report(name, f"error: {describe_os_error(e)}", FAILURE, logs)
        raise


def _report(name: str, message: str, code: int, logs) -> int:
    from shared.errors import INTERRUPTED

    line = " ".join(message.split())  # one line, whatever the message held
    logs.to_files_only(logging.ERROR if code != INTERRUPTED else logging.WARNING, line)
    try:
        print(f"fedcompose {name}: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
