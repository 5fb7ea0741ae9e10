"""Progress bars for long data work (on a terminal only: in logs they are noise)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def bar(description: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A `deploy.sources.Progress`: a tqdm bar on stderr, yielding `advance(n)`."""
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=description,
        unit=f" {unit}",  # "12.3k examples/s", not "12.3kexamples/s"
        unit_scale=True,
        file=sys.stderr,
        disable=None,
        dynamic_ncols=True,
        leave=False,
    ) as progress:
        yield progress.update
