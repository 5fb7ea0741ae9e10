"""A baseline task's generated stand-in as worker shards (`fedcompose data --task`).

The stand-in (`coordinator.tasks`) has the real dataset's element spec and a
few clients; its shards are written like any ClientData's
(`client_data.build_shards`), whole clients per worker.
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import UsageError


def stand_in_shards(task: str, out_dir: Path, workers: int) -> list[Path]:
    from coordinator import tasks
    from deploy.data.client_data import build_shards

    train, test = tasks.stand_in_data(task)
    if workers > len(train.client_ids):
        raise UsageError(
            f"--workers {workers} is more than the {len(train.client_ids)} clients of the "
            f"{task} stand-in; use at most {len(train.client_ids)} workers"
        )
    return build_shards(train, out_dir, workers=workers, test=test, dataset=f"{task} stand-in")
