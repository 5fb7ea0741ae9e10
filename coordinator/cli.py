"""`fedcompose train`: train over client workers that are already running."""

from __future__ import annotations

import argparse
import sys

from coordinator import config as config_lib

TRAIN_SECTIONS = ("federation", "model", "training", "evaluation", "output")
LAUNCHER_ONLY = ("workers", "base_port", "worker_check")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fedcompose train")
    parser.description = (
        "Compose the learning algorithm from TFF's building blocks (broadcast, clipped "
        "client SGD, weighted mean, server SGD) and train over running workers "
        "(`fedcompose worker`). Only worker addresses are needed: the coordinator learns "
        "what each worker hosts from the worker itself and never reads shard files. "
        "Restarting with the same --run-dir resumes after the last checkpoint."
    )
    config_lib.add_arguments(parser, TRAIN_SECTIONS, exclude=LAUNCHER_ONLY)
    return parser


def run(args: argparse.Namespace) -> int:
    from coordinator import session

    try:
        config = config_lib.resolve(args, TRAIN_SECTIONS)
    except config_lib.ConfigError as e:
        print(f"fedcompose train: error: {e}", file=sys.stderr)
        return 2
    if not config.federation.addresses:
        print(
            "fedcompose train: error: no workers given; pass --addresses host:port,... "
            "(or use `fedcompose run` to start workers on this machine)",
            file=sys.stderr,
        )
        return 2
    return session.run_training(config, list(config.federation.addresses), command="train")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
