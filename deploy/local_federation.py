"""A federation on this machine: worker processes started, supervised and stopped.

`LocalWorkers` is what `fedcompose run` and the Python API's `LocalFederation`
share: one `fedcompose worker` process per shard (each bound to loopback),
a `Supervisor` restarting one that crashes (bounded, with back-off), and, on
leaving, every one of them stopped, whatever ended the block. Workers also
stop when their parent dies (the kernel's PR_SET_PDEATHSIG): a notebook
kernel that is restarted or killed takes its workers with it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from coordinator.api import Federation, resolve_settings
from shared import config as config_lib
from shared.errors import UsageError

LOCAL_SECTIONS = ("data", "federation", "worker", "resilience")
"""What `LocalFederation(...)` takes by name: the `run` command's settings of
the data, the workers and their supervision."""
_NOT_HERE = {"shards_dir", "force", "addresses", "tls_dir", "insecure_plaintext_network"}
TRAINING_OWNED = frozenset({"worker_memory_mb", "shards_dir"})
"""Settings of `train(...)`, or given otherwise (`shards_dir=`)."""


class LocalWorkers:
    """Workers serving `shard_dirs` on this machine while the block runs."""

    def __init__(self, shard_dirs: list[Path], logs_dir: Path, config: config_lib.RunConfig):
        self.shard_dirs = shard_dirs
        self.logs_dir = logs_dir
        self.config = config
        self.started: list = []
        self._supervisor = None

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.started]

    def __enter__(self) -> LocalWorkers:
        from deploy import workers as workers_lib
        from shared import loopback

        # Every executor this starts is confined to loopback; without the shim, nothing starts.
        loopback.confine_children()
        c = self.config
        try:
            self.started = workers_lib.start_workers(
                self.shard_dirs,
                self.logs_dir,
                base_port=c.federation.base_port,
                check=c.worker.shard_check,
                ready_timeout=c.worker.ready_timeout,
                max_message_mb=c.worker.max_message_mb,
                verbose=c.output.verbose,
            )
            r = c.resilience
            if r.worker_restarts:
                self._supervisor = workers_lib.Supervisor(
                    self.started,
                    max_restarts=r.worker_restarts,
                    backoff=r.restart_backoff,
                    ready_timeout=c.worker.ready_timeout,
                ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        import logging

        from deploy import workers as workers_lib

        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.stop()
        started, self.started = self.started, []
        if started:
            logging.getLogger("fedcompose.launcher").info("stopping %d workers", len(started))
        workers_lib.stop_workers(started)


class LocalFederation(Federation):
    """`workers` worker processes on this machine, each serving one shard.

    The shards are `shards_dir`'s (built with `fedcompose data`), or built
    from the data settings (the offline default data unless `source=` says
    otherwise) into `work_dir` (default: a temporary directory, removed on
    close). Every other keyword is a setting of `fedcompose run` for the
    data, the workers and their supervision (`writers`, `partition`,
    `shard_check`, `worker_restarts`, ...).
    """

    command = "run"

    def __init__(
        self,
        workers: int | None = None,
        *,
        shards_dir: str | Path | None = None,
        work_dir: str | Path | None = None,
        verbose: bool = False,
        progress: bool = True,
        **settings_: Any,
    ):
        super().__init__(verbose=verbose, progress=progress)
        not_here = sorted(set(settings_) & _NOT_HERE)
        if not_here:
            raise TypeError(
                f"LocalFederation() does not take {', '.join(not_here)}: give shards_dir= for "
                "shards built already; workers of other machines are a RemoteFederation"
            )
        given = dict(settings_)
        if workers is not None:
            given["workers"] = workers
        self.config = resolve_settings(
            "run",
            LOCAL_SECTIONS,
            given,
            # Rounds' sizes are train()'s, checked against the clients the
            # workers host when it starts; none is asked of the data here.
            fixed={"verbose": verbose, "clients_per_round": 1},
            what="LocalFederation()",
            exclude=TRAINING_OWNED | set(config_lib._COORDINATOR_RESILIENCE),
            elsewhere="train()",
        )
        self._given_shards = Path(shards_dir) if shards_dir else None
        self._work_dir = Path(work_dir) if work_dir else None
        self._temporary: Path | None = None
        self._workers: LocalWorkers | None = None
        self.shard_dirs: list[Path] = []

    def _addresses(self) -> list[str]:
        return self._workers.addresses if self._workers else []

    def _shards(self, work: Path) -> list[Path]:
        from deploy.data import build

        c = self.config
        if self._given_shards is not None:
            from deploy.local import given_shards

            c.data.shards_dir = str(self._given_shards)
            return given_shards(c, "workers" in c.given)
        return build.build_shards(c.data, work / "shards", c.federation.workers)

    def _open(self):
        from coordinator.session import FederationSession

        if self._work_dir is not None:
            work = self._work_dir
            try:
                work.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise UsageError(f"work_dir {work} is a file; give a directory") from None
        else:
            work = self._temporary = Path(tempfile.mkdtemp(prefix="fedcompose-federation-"))
        self.shard_dirs = self._shards(work)
        self._workers = LocalWorkers(self.shard_dirs, work / "logs", self.config)
        self._workers.__enter__()
        f = self.config.federation
        return FederationSession(
            self._workers.addresses,
            rpc_timeout=f.rpc_timeout,
            connect_timeout=f.connect_timeout,
            log_dir=work / "logs",
        )

    def _stop(self) -> None:
        workers, self._workers = self._workers, None
        try:
            if workers is not None:
                workers.stop()
        finally:
            temporary, self._temporary = self._temporary, None
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
                self.shard_dirs = []  # they were in it

    def _fixed_settings(self) -> dict[str, Any]:
        f = self.config.federation
        return {
            "addresses": self._addresses(),
            "rpc_timeout": f.rpc_timeout,
            "connect_timeout": f.connect_timeout,
        }

    def run_in_tff(self, process: Any, *, preprocess: Any, **kwargs: Any) -> Any:
        """The same training in TFF's own single-process context, over this
        federation's shards (`fedcompose.tff_reference.run`)."""
        from coordinator import tff_reference

        if not self.shard_dirs:
            raise UsageError(
                "run_in_tff needs the federation's shards: call it inside the `with` block "
                "(or after start()), or use fedcompose.run_in_tff(..., shard_dirs=...)"
            )
        return tff_reference.run(
            process, preprocess=preprocess, shard_dirs=self.shard_dirs, **kwargs
        )
