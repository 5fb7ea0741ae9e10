"""TFF's federated EMNIST (`emnist_all.sqlite`) as a `FederatedSource`.

The file is the one `tff.simulation.datasets.emnist.load_data` downloads and
caches. Its schema (TFF's `SqlClientData`):

- `examples(split_name, client_id, serialized_example_proto)`: one row per
  example, a serialized `tf.train.Example` with `pixels` float32 [28, 28]
  (1.0 is background) and `label` int64;
- `client_metadata(client_id, split_name, num_examples)`;

with splits `digits_only_train` / `digits_only_test` (10 classes) and
`all_train` / `all_test` (62 classes). A writer's train and test examples stay
together as one client; writers without training examples are left out.

Reading is one scan of the table in storage order for both splits.
`client_metadata` says how many examples every writer has, so each example
is parsed (in batches, by `tf.io.parse_example`) straight into its place in
one preallocated array per split, every writer's examples contiguous, and
clients are views of it: the 62-class set (about 2.3 GB as float32) is held
once. Ordering the rows by writer in SQL instead would make SQLite sort
gigabytes of blobs, as TFF's table has no index on `client_id`. Should the
metadata disagree with the examples, they are counted and read again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import sqlite3
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from deploy.data.sources import (
    DataSourceError,
    ExamplePool,
    FederatedSource,
    PooledClient,
    Progress,
    no_progress,
)
from shared import shard_format
from shared.errors import one_line

log = logging.getLogger("fedcompose.data")

FILE_NAME = "emnist_all.sqlite"
DOWNLOAD_URL = "https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma"
DEFAULT_CACHE_DIR = Path("~/.tff")
"""Where TFF caches its data sets when given no `cache_dir`."""

REQUIRED_COLUMNS = {
    "examples": ("split_name", "client_id", "serialized_example_proto"),
    "client_metadata": ("client_id", "split_name", "num_examples"),
}
READ_BATCH = 4096
"""Rows parsed per `tf.io.parse_example` call: large enough to amortise the
call, small enough that the serialized batch (about 13 MB) stays negligible."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_HEADER_BYTES = 100


@dataclasses.dataclass(frozen=True)
class Variant:
    """One of the two EMNIST tasks in the file."""

    dataset: str
    label: str
    num_classes: int
    train_split: str
    test_split: str


DIGITS = Variant("emnist-digits", "digits", 10, "digits_only_train", "digits_only_test")
ALL_CLASSES = Variant("emnist-all", "all 62 classes", 62, "all_train", "all_test")


def variant(only_digits: bool) -> Variant:
    return DIGITS if only_digits else ALL_CLASSES


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which writers become clients and where their examples go in the pools.

    Writers are in sorted order; writer i's train examples are rows
    `train_offsets[i]:train_offsets[i + 1]` of the train pool (same for test).
    """

    writer_ids: tuple[str, ...]
    train_counts: np.ndarray
    test_counts: np.ndarray
    left_out: frozenset[str]
    """Writers with test examples but no training examples."""
    examples_left_out: int

    @property
    def train_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.train_counts)]).astype(np.int64)

    @property
    def test_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.test_counts)]).astype(np.int64)

    @property
    def train_examples(self) -> int:
        return int(self.train_counts.sum())

    @property
    def test_examples(self) -> int:
        return int(self.test_counts.sum())


@dataclasses.dataclass(frozen=True)
class Survey:
    """What the file holds for one variant, known without reading the examples."""

    path: Path
    variant: Variant
    writers: int
    train_examples: int
    test_examples: int
    writers_left_out: int
    examples_left_out: int


class _LayoutMismatch(Exception):
    """The examples table does not match the layout taken from `client_metadata`."""


# --- locating (and if need be downloading) the file --------------------------------


def resolve_path(location: str | Path) -> Path:
    """The database file meant by `location`: the file itself or a directory holding it.

    An empty location means TFF's own cache, so a file `load_data` downloaded
    earlier is found without being named.
    """
    path = Path(location or DEFAULT_CACHE_DIR).expanduser()
    if path.is_dir():
        return path / FILE_NAME
    if path.is_file() or path.suffix in (".sqlite", ".sqlite3", ".db"):
        return path
    return path / FILE_NAME


def ensure_file(path: Path, only_digits: bool = True) -> Path:
    """Returns `path`, downloading it with TFF first if it is missing."""
    if path.exists():
        return path
    if path.name != FILE_NAME:
        raise DataSourceError(
            f"{path}: no such file (TFF's federated EMNIST is {FILE_NAME}; give that file or "
            "the directory holding it)"
        )
    log.info("%s is missing; asking TFF to download it (about 1.7 GB)", path)
    _download_with_tff(path, only_digits)
    if not path.is_file():
        raise DataSourceError(_missing_message(path, f"TFF did not create {path.name}"))
    return path


def _download_with_tff(path: Path, only_digits: bool) -> None:
    made_cache_dir = not path.parent.exists()
    downloaded = False
    try:
        import tensorflow_federated as tff

        tff.simulation.datasets.emnist.load_data(
            only_digits=only_digits, cache_dir=str(path.parent)
        )
        downloaded = True
    except Exception as e:  # any failure here means the same to the user: no file
        # urllib's errors keep the cause (name resolution, refused) in `reason`.
        raise DataSourceError(
            _missing_message(path, one_line(getattr(e, "reason", None) or e))
        ) from None
    finally:
        if not downloaded:
            # TFF decompresses straight into the final name; an interrupted
            # download would otherwise pass for a (truncated) database next time.
            path.unlink(missing_ok=True)
            if made_cache_dir:
                with contextlib.suppress(OSError):  # only if TFF left it empty
                    path.parent.rmdir()


def _missing_message(path: Path, reason: str) -> str:
    return (
        f"{path}: EMNIST file missing and could not be downloaded ({reason}); on a machine "
        f"with internet access download {DOWNLOAD_URL}, decompress it (unlzma) and put "
        f"{FILE_NAME} at {path}"
    )


# --- checking the file before trusting it ---------------------------------------------


def check_sqlite_header(path: Path) -> None:
    """Rejects files that are not SQLite or are shorter than their header says.

    A truncated database often opens and answers schema queries fine and only
    fails deep into a multi-minute read; the header's page count catches it
    at once.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(_SQLITE_HEADER_BYTES)
    except OSError as e:
        raise DataSourceError(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise DataSourceError(f"{path}: empty file, not an SQLite database")
    if len(header) < _SQLITE_HEADER_BYTES or not header.startswith(_SQLITE_MAGIC):
        raise DataSourceError(f"{path}: not an SQLite database")
    (page_size,) = struct.unpack(">H", header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages = struct.unpack(">II", header[24:32])
    (valid_for,) = struct.unpack(">I", header[92:96])
    # The page count is only maintained by SQLite >= 3.7.0, which marks it valid
    # by copying the change counter; older files fall back to whole pages.
    expected = page_size * pages if pages and valid_for == change_counter else 0
    if size < expected or size % page_size:
        raise DataSourceError(
            f"{path}: truncated SQLite database ({size} bytes"
            + (f", its header says {expected}" if expected else "")
            + "); delete it and download it again"
        )


def _connect_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


@contextlib.contextmanager
def _database_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as e:
        if "unable to open" not in str(e):
            raise _damaged(path, e) from None
        raise DataSourceError(f"{path}: cannot open as an SQLite database ({e})") from None
    except sqlite3.DatabaseError as e:
        raise _damaged(path, e) from None


def _damaged(path: Path, error: sqlite3.DatabaseError) -> DataSourceError:
    return DataSourceError(
        f"{path}: unreadable SQLite database ({error}); the file is damaged or incomplete, "
        "delete it and download it again"
    )


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for table, columns in REQUIRED_COLUMNS.items():
        if table not in tables:
            raise DataSourceError(
                f"{path}: not TFF's federated EMNIST: table {table!r} is missing"
                f" (tables: {', '.join(sorted(tables)) or 'none'})"
            )
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataSourceError(
                f"{path}: not TFF's federated EMNIST: table {table!r} lacks column(s) "
                f"{', '.join(missing)}"
            )


@contextlib.contextmanager
def _open_checked(path: Path) -> Iterator[sqlite3.Connection]:
    check_sqlite_header(path)
    with _database_errors(path), contextlib.closing(_connect_read_only(path)) as conn:
        _check_schema(conn, path)
        yield conn


# --- where every writer's examples go --------------------------------------------------


def _counts_from_metadata(conn: sqlite3.Connection, split: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT client_id, SUM(num_examples) FROM client_metadata WHERE split_name = ? "
        "GROUP BY client_id",
        (split,),
    )
    return {str(cid): int(n or 0) for cid, n in rows}


def _counts_from_examples(conn: sqlite3.Connection, split: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT client_id, COUNT(*) FROM examples WHERE split_name = ? GROUP BY client_id",
        (split,),
    )
    return {str(cid): int(n) for cid, n in rows}


def _layout_from_counts(train: dict[str, int], test: dict[str, int]) -> Layout:
    writers = tuple(sorted(cid for cid, n in train.items() if n > 0))
    left_out = frozenset(cid for cid in set(train) | set(test) if train.get(cid, 0) <= 0)
    return Layout(
        writer_ids=writers,
        train_counts=np.array([train[w] for w in writers], dtype=np.int64),
        test_counts=np.array([max(0, test.get(w, 0)) for w in writers], dtype=np.int64),
        left_out=left_out,
        examples_left_out=sum(max(0, test.get(cid, 0)) for cid in left_out),
    )


def _layout(conn: sqlite3.Connection, path: Path, kind: Variant, trust_metadata: bool) -> Layout:
    count = _counts_from_metadata if trust_metadata else _counts_from_examples
    layout = _layout_from_counts(count(conn, kind.train_split), count(conn, kind.test_split))
    if not layout.writer_ids and trust_metadata:
        return _layout(conn, path, kind, trust_metadata=False)
    if not layout.writer_ids:
        raise DataSourceError(
            f"{path}: no training examples in split {kind.train_split!r}; not TFF's federated "
            "EMNIST, or a copy without that split"
        )
    return layout


# --- reading ---------------------------------------------------------------------------

Parser = Callable[[list[bytes]], tuple[np.ndarray, np.ndarray]]


def _example_parser(path: Path) -> Parser:
    import tensorflow as tf

    features = {
        "pixels": tf.io.FixedLenFeature(shape=shard_format.IMAGE_SHAPE, dtype=tf.float32),
        "label": tf.io.FixedLenFeature(shape=(), dtype=tf.int64),
    }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        parsed = tf.io.parse_example(serialized, features)
        return parsed["pixels"], parsed["label"]

    def parse_batch(protos: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        try:
            pixels, labels = parse(tf.constant(protos, dtype=tf.string))
        except tf.errors.OpError as e:
            raise DataSourceError(
                f"{path}: holds records that are not EMNIST examples "
                f"(pixels float32 [28, 28], label int64): {one_line(e.message)}"
            ) from None
        return pixels.numpy(), labels.numpy()

    return parse_batch


@dataclasses.dataclass
class _SplitFill:
    """One split's pool and where each writer's next example goes in it."""

    split: str
    counts: np.ndarray
    pool: ExamplePool
    next_row: list[int]
    end_row: list[int]

    @classmethod
    def empty(cls, split: str, counts: np.ndarray) -> _SplitFill:
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(
            split=split,
            counts=counts,
            pool=ExamplePool.empty(int(offsets[-1])),
            next_row=offsets[:-1].tolist(),
            end_row=offsets[1:].tolist(),
        )

    def take_row(self, writer: int, writer_id: str) -> int:
        row = self.next_row[writer]
        if row >= self.end_row[writer]:
            raise _LayoutMismatch(
                f"split {self.split!r} has more examples of writer {writer_id!r} than "
                "client_metadata says"
            )
        self.next_row[writer] = row + 1
        return row

    def check_full(self, writer_ids: tuple[str, ...]) -> None:
        for i, (row, end) in enumerate(zip(self.next_row, self.end_row, strict=True)):
            if row != end:
                found = int(self.counts[i]) - (end - row)
                raise _LayoutMismatch(
                    f"split {self.split!r} has {found} examples of writer {writer_ids[i]!r}, "
                    f"client_metadata says {int(self.counts[i])}"
                )


def _place_batch(
    batch: list[tuple[str, str, bytes]],
    index: dict[str, int],
    layout: Layout,
    fills: dict[str, _SplitFill],
) -> tuple[list[str], np.ndarray, list[bytes]]:
    """For each row kept: its split, its row in that split's pool, its proto.

    A writer's examples take consecutive rows in storage order, so each
    writer's examples keep the order TFF's own reader gives them.
    """
    splits: list[str] = []
    rows: list[int] = []
    protos: list[bytes] = []
    for split, raw_id, proto in batch:
        writer_id = str(raw_id)
        i = index.get(writer_id)
        if i is None:
            if writer_id in layout.left_out:
                continue
            raise _LayoutMismatch(
                f"split {split!r} has examples of writer {writer_id!r}, which "
                "client_metadata does not list"
            )
        rows.append(fills[split].take_row(i, writer_id))
        splits.append(split)
        protos.append(proto)
    return splits, np.array(rows, dtype=np.int64), protos


def _check_values(path: Path, kind: Variant, pixels: np.ndarray, labels: np.ndarray) -> None:
    bad_labels = (labels < 0) | (labels >= kind.num_classes)
    if bad_labels.any():
        raise DataSourceError(
            f"{path}: label {int(labels[bad_labels][0])} is outside 0..{kind.num_classes - 1}, "
            f"the classes of EMNIST {kind.label}"
        )
    if not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0:
        raise DataSourceError(f"{path}: pixel values outside [0, 1]")


def _read_pools(
    conn: sqlite3.Connection, path: Path, kind: Variant, layout: Layout, progress: Progress
) -> tuple[ExamplePool, ExamplePool]:
    """Both splits in one scan of the table (the real file is several GB)."""
    parse = _example_parser(path)  # imports TensorFlow, which takes seconds: not "reading"
    fills = {
        kind.train_split: _SplitFill.empty(kind.train_split, layout.train_counts),
        kind.test_split: _SplitFill.empty(kind.test_split, layout.test_counts),
    }
    index = {w: i for i, w in enumerate(layout.writer_ids)}
    # rowid order is storage order: a plain scan, deterministic, no sort.
    cursor = conn.execute(
        "SELECT split_name, client_id, serialized_example_proto FROM examples "
        "WHERE split_name IN (?, ?) ORDER BY rowid",
        (kind.train_split, kind.test_split),
    )
    total = layout.train_examples + layout.test_examples
    with progress(f"reading {path.name}", total, "examples") as advance:
        while batch := cursor.fetchmany(READ_BATCH):
            splits, rows, protos = _place_batch(batch, index, layout, fills)
            if not protos:
                continue
            pixels, labels = parse(protos)
            _check_values(path, kind, pixels, labels)
            in_split = np.array(splits)
            for split, fill in fills.items():
                mine = in_split == split
                fill.pool.pixels[rows[mine]] = pixels[mine]
                fill.pool.labels[rows[mine]] = labels[mine]
            advance(len(protos))
    for fill in fills.values():
        fill.check_full(layout.writer_ids)
        # Clients are views of the pools: a stray write through one must fail
        # loudly rather than change another client's examples.
        fill.pool.pixels.flags.writeable = False
        fill.pool.labels.flags.writeable = False
    return fills[kind.train_split].pool, fills[kind.test_split].pool


# --- public entry points ---------------------------------------------------------------


def survey(location: str | Path, only_digits: bool = True) -> Survey:
    """Checks the file and counts its writers and examples (downloads it if missing).

    Reads only the metadata, so a bad request (say more shards than writers)
    is refused in a second instead of after a full read.
    """
    path = ensure_file(resolve_path(location), only_digits)
    kind = variant(only_digits)
    with _open_checked(path) as conn:
        layout = _layout(conn, path, kind, trust_metadata=True)
    return Survey(
        path=path,
        variant=kind,
        writers=len(layout.writer_ids),
        train_examples=layout.train_examples,
        test_examples=layout.test_examples,
        writers_left_out=len(layout.left_out),
        examples_left_out=layout.examples_left_out,
    )


def load(
    location: str | Path, only_digits: bool = True, progress: Progress = no_progress
) -> FederatedSource:
    """Reads one EMNIST variant from the file at (or in) `location`."""
    path = ensure_file(resolve_path(location), only_digits)
    kind = variant(only_digits)
    with _open_checked(path) as conn:
        layout = _layout(conn, path, kind, trust_metadata=True)
        try:
            train, test = _read_pools(conn, path, kind, layout, progress)
        except _LayoutMismatch as e:
            log.warning("%s: %s; counting the examples themselves and reading again", path, e)
            layout = _layout(conn, path, kind, trust_metadata=False)
            try:
                train, test = _read_pools(conn, path, kind, layout, progress)
            except _LayoutMismatch as again:
                raise DataSourceError(f"{path}: {again} (changed while being read?)") from None
    if layout.left_out:
        log.info(
            "left out %d writer(s) without training examples (%d test examples)",
            len(layout.left_out),
            layout.examples_left_out,
        )
    return _as_source(path, kind, layout, train, test)


def _as_source(
    path: Path, kind: Variant, layout: Layout, train: ExamplePool, test: ExamplePool
) -> FederatedSource:
    train_at, test_at = layout.train_offsets, layout.test_offsets
    clients = [
        PooledClient(
            id=file_safe_id(writer),
            train_pool=train,
            train_rows=slice(int(train_at[i]), int(train_at[i + 1])),
            test_pool=test,
            test_rows=slice(int(test_at[i]), int(test_at[i + 1])),
        )
        for i, writer in enumerate(layout.writer_ids)
    ]
    description = (
        f"TFF federated EMNIST, {kind.label}, from {path}: {len(clients)} writers, "
        f"{layout.train_examples} train / {layout.test_examples} test examples"
    )
    return FederatedSource(
        dataset=kind.dataset,
        num_classes=kind.num_classes,
        clients=clients,
        description=description,
        writers_left_out=len(layout.left_out),
        examples_left_out=layout.examples_left_out,
    )


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def file_safe_id(writer_id: str) -> str:
    """`writer_id` if it can name a shard file, else a readable unique stand-in.

    EMNIST's writer ids (like `f0000_14`) pass unchanged; anything else keeps
    its safe characters plus a hash of the original, so ids stay distinct.
    """
    if shard_format.CLIENT_ID_PATTERN.match(writer_id):
        return writer_id
    digest = hashlib.sha256(writer_id.encode()).hexdigest()[:10]
    stem = _UNSAFE_CHARS.sub("_", writer_id).lstrip("_.-")[:100]
    return f"{stem}-{digest}" if stem else f"writer-{digest}"
