"""A run's directory: resolved config, metrics, TensorBoard, plot, checkpoints.

config.toml        the resolved configuration (feed it back with --config)
status.json        running / finished / failed / interrupted, rounds done and checkpointed
trained_on.json    what the run was trained on: shard build, dataset, clients
metrics.csv        one row per round (appended; rewritten only when a new column appears)
metrics.jsonl      the same, one JSON object per round, with per-worker times (appended)
tensorboard/       event files (scalars, written directly as TensorBoard events)
checkpoints/       server state, one `round_N/state.npz` each (written aside, synced, renamed;
                   older runs' TFF SavedModel checkpoints are still read)
metrics.png        loss and accuracy against round
final_model.npz    the final global model weights
logs/              coordinator and worker logs
.lock              held (flock) by the one process that uses the directory

Rules that keep the directory whole, whatever happens to the process:

* One user at a time: `locked` (lock.py) takes an exclusive `flock` on `.lock` for the
  process's life. The kernel drops it when the holder dies, even by SIGKILL,
  so a killed run never leaves the directory stuck; a second coordinator is
  refused before it writes anything.
* Nothing changes before the resume is known to be sound: `plan_resume`
  (settings) and `check_trained_on` (data) only read.
* Every file is replaced in one step (temporary + rename), or appended to
  (metrics): an append that fails is cut back to where it began, and a line a
  crash cut short is repaired at the next start (`prepare_metrics`); a
  temporary a killed writer left is removed at the next start, under the lock.
* The newest checkpoint is the truth a resume continues from; metrics after
  it are dropped, and `status.json` is set from what is on disk when a run
  stops, so it agrees with the checkpoints and metrics.
* A checkpoint that cannot be read (cut short by a crash or a full disk) is
  set aside with a warning and the newest intact one is used; one that reads
  but does not fit the model is refused.
* Every failure to write is one line naming the file (`RunDirError`).

Modules, one concept each:

lock.py            the directory's lock and the sweep of temporaries killed writers left
logs.py            logging into the directory's logs/
record.py          what a run was trained on (trained_on.json)
resume.py          how a command starts on the directory, decided by reading only
directory.py       `RunDirectory`: where each file lives, config, data record, status, artefacts
checkpoints.py     the server state's checkpoints: written, kept, restored
metrics.py         each round's metrics appended to metrics.csv / metrics.jsonl, read back
events.py          TensorBoard event files of the same scalars
metrics_repair.py  metrics files brought in line with the checkpoint a run resumes from
safe_io.py         one-line errors naming the file, whole appends, names to set files aside

The privacy ledger (privacy.jsonl) is kept by `coordinator.privacy`.
"""

from coordinator.run_dir.checkpoints import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    CHECKPOINT_PREFIX,
    UNREADABLE_PREFIX,
    state_leaves,
)
from coordinator.run_dir.directory import RunDirectory
from coordinator.run_dir.lock import LOCK_NAME, RUN_ENTRIES, locked
from coordinator.run_dir.logs import setup_logs
from coordinator.run_dir.record import data_record, describe_record, record_differences
from coordinator.run_dir.resume import ResumePlan, config_to_record, plan_resume

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_PREFIX",
    "LOCK_NAME",
    "RUN_ENTRIES",
    "UNREADABLE_PREFIX",
    "ResumePlan",
    "RunDirectory",
    "config_to_record",
    "data_record",
    "describe_record",
    "locked",
    "plan_resume",
    "record_differences",
    "setup_logs",
    "state_leaves",
]
