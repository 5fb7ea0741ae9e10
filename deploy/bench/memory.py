"""Peak memory of the processes under measurement, per workload.

A background thread in the benchmark process (never in a measured process,
whose timing it would disturb) samples the resident set size of every
watched process ten times a second and keeps the largest value per role and
workload. A role is a process (say the coordinator) and optionally its TFF
executor child (`worker_binary`), which is tracked as a role of its own.
The kernel's own high-water mark (VmHWM) is read as well: it cannot miss a
short spike, but covers a process's whole life rather than one workload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

import psutil

EXECUTOR_NAME = "worker_binary"


@dataclasses.dataclass
class _Watched:
    role: str
    process: psutil.Process
    executor_role: str | None
    executor: psutil.Process | None = None


def vm_hwm_bytes(pid: int) -> int | None:
    """The process's peak resident set size so far, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemorySampler:
    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self._watched: list[_Watched] = []
        self._phase: str | None = None
        self._peaks: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def watch(self, role: str, pid: int, executor_role: str | None = None) -> None:
        """Samples `pid` as `role`, and its executor child as `executor_role`."""
        with contextlib.suppress(psutil.Error), self._lock:
            self._watched.append(_Watched(role, psutil.Process(pid), executor_role))

    def unwatch_all(self) -> None:
        with self._lock:
            self._watched.clear()

    def set_phase(self, phase: str | None) -> None:
        with self._lock:
            self._phase = phase
            if phase is not None:
                self._peaks.setdefault(phase, {})
        if phase is not None:
            self._sample()

    def peaks(self, phase: str) -> dict[str, int]:
        with self._lock:
            return dict(self._peaks.get(phase, {}))

    def high_water_marks(self) -> dict[str, int]:
        """VmHWM of every watched process (and executor) that is still alive."""
        marks: dict[str, int] = {}
        with self._lock:
            for w in self._watched:
                self._find_executor(w)
                for role, proc in ((w.role, w.process), (w.executor_role, w.executor)):
                    if role and proc is not None:
                        mark = vm_hwm_bytes(proc.pid)
                        if mark is not None:
                            marks[role] = mark
        return marks

    def _find_executor(self, w: _Watched) -> None:
        if w.executor_role is None:
            return
        if w.executor is not None and w.executor.is_running():
            return
        w.executor = None
        with contextlib.suppress(psutil.Error):
            for child in w.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.name() == EXECUTOR_NAME or EXECUTOR_NAME in " ".join(
                        child.cmdline()[:1]
                    ):
                        w.executor = child
                        return

    def _sample(self) -> None:
        with self._lock:
            phase = self._phase
            if phase is None:
                return
            peaks = self._peaks[phase]
            for w in self._watched:
                self._find_executor(w)
                for role, proc in ((w.role, w.process), (w.executor_role, w.executor)):
                    if not role or proc is None:
                        continue
                    try:
                        rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    if rss > peaks.get(role, 0):
                        peaks[role] = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
