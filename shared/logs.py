"""Logging set-up shared by every command: short lines on stderr, full in a file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup(verbose: bool = False, log_file: Path | None = None, name: str = "fedcompose") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(
        logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s", "%H:%M:%S")
    )
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        )
        handler.setLevel(logging.DEBUG)
        root.addHandler(handler)
    for noisy in ("tensorflow", "absl", "jax", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
