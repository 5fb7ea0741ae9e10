"""`fedcompose`: one command, with a subcommand per job.

Each subcommand lives in its own module with `build_parser(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so
`fedcompose worker` never pays for importing TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "deploy.local",
        "start workers and coordinator on this machine and train (the default job)",
    ),
    "worker": ("client_worker.cli", "serve one shard of clients (TFF executor service)"),
    "train": ("coordinator.cli", "train over workers that are already running"),
    "data": ("deploy.data_cli", "build worker shards from a federated dataset"),
    "status": ("deploy.status", "show whether workers are up and what they host"),
    "bench": ("deploy.benchmark", "measure where a round's time goes, against baselines"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before anything imports TensorFlow: its C++ log level is read once, at load.
    from shared.quiet import quiet_tensorflow

    quiet_tensorflow(verbose="--verbose" in argv)
    parser = argparse.ArgumentParser(
        prog="fedcompose",
        description="A multi-process federated-learning simulator on TFF's remote executors.",
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
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"fedcompose {name}")
    module.build_parser(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"fedcompose {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
