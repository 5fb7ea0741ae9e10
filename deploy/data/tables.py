"""A table of examples with a client-id column, from a file (`fedcompose data --from-table`).

One row per example. `.csv` and `.parquet` are read with pandas (parquet needs
pyarrow); a `.npz` holds one array per column, all of the same length, and
its columns may be arrays per row (an `images` array `[n, 8, 8, 3]`). A
column named `split` holding "train" / "test" says which rows are held out;
without it every row is a training example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploy.data.sources import DataSourceError
from shared.errors import UsageError

SPLIT_COLUMN = "split"
SUFFIXES = (".npz", ".csv", ".parquet")


def _by_client(columns: dict[str, Any], ids: np.ndarray, rows: np.ndarray) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for cid in dict.fromkeys(ids[rows]):
        mine = rows[ids[rows] == cid]
        out[str(cid)] = {name: values[mine] for name, values in columns.items()}
    return out


def split_clients(
    columns: dict[str, np.ndarray], client_id_column: str, origin: str
) -> tuple[dict, dict | None]:
    """({client: train columns}, {client: test columns} or None) of whole columns."""
    if client_id_column not in columns:
        raise UsageError(
            f"{origin}: no client-id column {client_id_column!r} (columns: "
            f"{', '.join(columns)}); name it with --client-id-column"
        )
    ids = np.asarray(columns[client_id_column]).astype(str)
    split = columns.get(SPLIT_COLUMN)
    fields = {k: v for k, v in columns.items() if k not in (client_id_column, SPLIT_COLUMN)}
    lengths = {k: len(v) for k, v in fields.items()}
    if any(n != len(ids) for n in lengths.values()):
        raise DataSourceError(f"{origin}: columns of different lengths ({lengths})")
    if split is None:
        return _by_client(fields, ids, np.arange(len(ids))), None
    split = np.asarray(split).astype(str)
    unknown = sorted(set(split) - {"train", "test"})
    if unknown:
        raise DataSourceError(
            f"{origin}: column {SPLIT_COLUMN!r} holds {unknown[0]!r}; use 'train' or 'test'"
        )
    train = _by_client(fields, ids, np.flatnonzero(split == "train"))
    test = _by_client(fields, ids, np.flatnonzero(split == "test"))
    return train, test


def _frame_columns(frame: Any) -> dict[str, Any]:
    from deploy.data.client_data import _frame_column

    return {str(c): _as_array(_frame_column(frame[c])) for c in frame.columns}


def _as_array(column: Any) -> np.ndarray:
    if isinstance(column, list):  # variable-length rows: an object array of arrays
        out = np.empty(len(column), dtype=object)
        out[:] = column
        return out
    return np.asarray(column)


def load(path: str | Path, client_id_column: str) -> tuple[dict, dict | None]:
    """The table at `path` as clients' train (and test) columns."""
    path = Path(path).expanduser()
    if path.suffix not in SUFFIXES:
        raise UsageError(f"--from-table {path}: use a {', '.join(SUFFIXES)} file")
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as saved:
                columns = {name: saved[name] for name in saved.files}
        else:
            import pandas as pd

            reader = pd.read_csv if path.suffix == ".csv" else pd.read_parquet
            columns = _frame_columns(reader(path))
    except ImportError as e:
        raise DataSourceError(
            f"{path}: reading it needs {e.name}, which is not installed"
        ) from None
    except (OSError, ValueError) as e:
        raise DataSourceError(f"{path}: cannot read ({str(e).splitlines()[0][:200]})") from None
    return split_clients(columns, client_id_column, str(path))
