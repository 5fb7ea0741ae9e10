"""TensorBoard event files of the run's scalars, written directly (no TensorFlow)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from coordinator.run_dir.safe_io import writing

_SCALAR_METADATA: Any = None


class TensorBoardEvents:
    """The TensorBoard part of a `RunDirectory`."""

    tensorboard_dir: Path
    _tensorboard: Any

    def _tensorboard_event(self, round_num: int, scalars: dict[str, float]) -> None:
        from tensorboard.compat.proto import (
            event_pb2,
            summary_pb2,
            tensor_pb2,
            tensor_shape_pb2,
            types_pb2,
        )

        global _SCALAR_METADATA
        if _SCALAR_METADATA is None:
            _SCALAR_METADATA = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                data_class=summary_pb2.DATA_CLASS_SCALAR,
            )

        if self._tensorboard is None:
            from tensorboard.summary.writer.record_writer import RecordWriter

            self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
            name = (
                f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.fedcompose"
            )
            self._tensorboard = RecordWriter(open(self.tensorboard_dir / name, "ab"))  # noqa: SIM115
            first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._tensorboard.write(first.SerializeToString())
        # As tf.summary.scalar writes them (a float32 tensor, the scalars plugin), so
        # that tools reading TFF's events (`Tensors`, not legacy `Scalars`) read these.
        values = [
            summary_pb2.Summary.Value(
                tag=k,
                tensor=tensor_pb2.TensorProto(
                    dtype=types_pb2.DT_FLOAT,
                    tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                    float_val=[v],
                ),
                metadata=_SCALAR_METADATA,
            )
            for k, v in scalars.items()
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=round_num, summary=summary_pb2.Summary(value=values)
        )
        self._tensorboard.write(event.SerializeToString())

    def flush_tensorboard(self) -> None:
        if self._tensorboard is not None:
            with writing("TensorBoard events", self.tensorboard_dir):
                self._tensorboard.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard event file."""
        writer, self._tensorboard = self._tensorboard, None
        if writer is not None:
            with writing("TensorBoard events", self.tensorboard_dir):
                writer.close()
