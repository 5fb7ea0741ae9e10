"""`fedcompose`: one command, with a subcommand per job.

Each subcommand lives in its own module with a `DESCRIPTION` and
`run(config) -> int`; its flags, `--help` and validation come from the one
declaration of every setting (`shared.config`). Modules are imported only
when their subcommand runs, so `fedcompose worker` never pays for importing
TensorFlow. This is also the one
place where errors become what the user sees: a `FedcomposeError` (or an
`OSError` that escaped) is one line on stderr and its exit code
(`shared.errors`), an interrupt is exit 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
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
    argv = sys.argv[1:] if argv is None else argv
    # Before anything imports TensorFlow: its C++ log level is read once, at load.
    from shared.quiet import quiet_tensorflow

    quiet_tensorflow(verbose="--verbose" in argv)
    parser = argparse.ArgumentParser(
        prog="fedcompose",
        description="A multi-process federated-learning simulator on TFF's remote executors.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage, 3 data, 4 federation (workers), "
        "5 run directory, 6 training (non-finite values), 130 interrupted. "
        "`fedcompose COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}")
    from shared import config

    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"fedcompose {name}", description=module.DESCRIPTION)
    config.add_arguments(sub_parser, name)
    args = sub_parser.parse_args(argv[1:])
    return run_reporting(name, lambda: module.run(config.resolve(args, name)))


def run_reporting(name: str, body) -> int:
    """Runs a command's body; every error it raises becomes one line and an exit code."""
    from shared import interrupts, logs
    from shared.errors import INTERRUPTED, FedcomposeError, describe_os_error

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
            return _report(name, f"error: {describe_os_error(e)}", 1, logs)
        raise


def _report(name: str, message: str, code: int, logs) -> int:
    line = " ".join(message.split())  # one line, whatever the message held
    logs.to_files_only(logging.ERROR if code != 130 else logging.WARNING, line)
    try:
        print(f"fedcompose {name}: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
