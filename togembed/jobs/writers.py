"""Writing an output file: (id, vector) rows to .parquet, .npy (+ ``NAME.ids.txt``) or .jsonl,
a block at a time, in order (``OutputFile``), or all at once (``write_output``).

Outputs are written to a hidden temp file beside the target and renamed over it at the end, so a
killed export never leaves a half file under the final name; the data is synced as the file
grows, and the rename is made durable.

May import: the standard library, numpy, orjson, pyarrow (on demand); ``filetypes``, ``durable``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .durable import fsync_dir, fsync_file
from .filetypes import OUTPUT_SUFFIXES, CorpusError, check_suffix, pyarrow

__all__ = ["PARQUET_META_KEY", "OutputFile", "npy_ids_path", "write_output"]

PARQUET_ROW_GROUP = 8192
PARQUET_META_KEY = b"togembed"  # schema metadata: how the vectors were made (JSON)
# ...or fewer rows for wide vectors: the writer holds about three copies of a row group.
_PARQUET_ROW_GROUP_BYTES = 16 << 20
_WRITE_BLOCK = 1024  # rows write_output hands to an OutputFile at a time
_SYNC_BYTES = 16 << 20  # an output is synced to disk each time this much more was written


def npy_ids_path(path: str | os.PathLike[str]) -> Path:
    """The ids sidecar of a .npy output: ``vectors.npy`` -> ``vectors.ids.txt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.ids.txt")


def write_output(
    path: str | os.PathLike[str],
    rows: Iterable[tuple[str, np.ndarray]],
    *,
    dim: int,
    count: int,
) -> int:
    """Write ``count`` (id, vector) rows, in the order given, to a .parquet, .npy or .jsonl file
    chosen by suffix; returns the rows written. (``OutputFile`` writes one block at a time.)

    - .parquet: columns ``id`` (string) and ``embedding`` (fixed_size_list<float32>[dim]),
      row groups of 8192 rows (fewer when vectors are wider than 512: at most 16 MiB).
    - .npy: a float32 array of shape (count, dim), plus ``<stem>.ids.txt`` beside it with one id
      per line in the same order (so ids must not contain line breaks).
    - .jsonl: one ``{"id": ..., "embedding": [...]}`` per line.

    ``count`` must match the rows given (it catches a job that would silently drop or repeat
    rows). Nothing appears under the final name unless the whole file was written.
    """
    out = OutputFile.create(path, dim=dim, max_rows=count)
    try:
        ids: list[str] = []
        block = np.empty((_WRITE_BLOCK, dim), dtype="<f4")
        for rid, vector in rows:
            block[len(ids)] = _row_vector(out.path, rid, vector, dim)
            ids.append(rid)
            if len(ids) == _WRITE_BLOCK:
                out.write(ids, block)
                ids = []
        if ids:
            out.write(ids, block[: len(ids)])
        return out.commit(count)
    except BaseException:
        out.abort()
        raise


class OutputFile:
    """An output file written a block of rows at a time, in order, to a hidden temp file beside
    the target: ``commit`` renames it over the target, ``abort`` deletes it. The temp name is
    fixed, so a re-run after a kill overwrites the leftover. Used from one thread at a time."""

    def __init__(
        self, path: Path, dim: int, max_rows: int, metadata: dict[str, Any] | None = None
    ) -> None:
        self.path = path
        self.dim = dim
        self.max_rows = max_rows
        self.metadata = metadata
        self.written = 0
        self._temps: list[tuple[Path, Path]] = []  # (temp, target), renamed in this order
        self._done = False
        # Vector bytes written since the last fdatasync: synced as the file grows, so that
        # commit() waits for the last few MB, not for the whole file (a job's last step).
        self._unsynced = 0

    @staticmethod
    def create(
        path: str | os.PathLike[str],
        *,
        dim: int,
        max_rows: int,
        metadata: dict[str, Any] | None = None,
    ) -> OutputFile:
        """Start writing ``path`` (.parquet, .npy or .jsonl) with at most ``max_rows`` rows
        (the .npy header is sized for it). ``metadata`` (JSON-serializable: the model, the
        input, its fields) goes into a Parquet file's schema metadata under ``togembed``, so
        that ``togembed search`` knows how the vectors were made; the other formats have no
        place for it."""
        path = Path(path)
        suffix = check_suffix(path, OUTPUT_SUFFIXES, "output")
        if suffix == ".parquet":
            return _ParquetOutput(path, dim, max_rows, metadata)
        if suffix == ".npy":
            return _NpyOutput(path, dim, max_rows, metadata)
        return _JsonlOutput(path, dim, max_rows, metadata)

    @staticmethod
    def prepare(path: str | os.PathLike[str]) -> None:
        """Check the output type and import what writing it needs (pyarrow: ~0.1 s), before a
        job pays for anything and while nothing else competes for the interpreter."""
        if check_suffix(Path(path), OUTPUT_SUFFIXES, "output") == ".parquet":
            pyarrow()

    def _temp(self, target: Path) -> Path:
        tmp = target.with_name(f".{target.name}.togembed-tmp")
        self._temps.append((tmp, target))
        return tmp

    def write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append rows: ``vectors`` is (len(ids), dim)."""
        if vectors.shape != (len(ids), self.dim):
            raise CorpusError(
                f"{len(ids)} ids and vectors of shape {vectors.shape}: expected "
                f"({len(ids)}, {self.dim})",
                path=self.path,
            )
        if self.written + len(ids) > self.max_rows:
            raise CorpusError(f"more than the {self.max_rows} rows announced", path=self.path)
        self._write(ids, vectors)
        self.written += len(ids)
        self._unsynced += vectors.nbytes
        if self._unsynced >= _SYNC_BYTES:
            self._unsynced = 0
            for tmp, _ in self._temps:
                fsync_file(tmp, data_only=True)

    def commit(self, count: int) -> int:
        """Check that ``count`` rows were written, finish the file, make it durable and move it
        to its name; returns the rows written."""
        try:
            if self.written != count:
                raise CorpusError(
                    f"expected {count} rows, got {self.written}; output not written",
                    path=self.path,
                )
            self._close()
            for tmp, _ in self._temps:
                fsync_file(tmp)
            # A .npy's sidecar first: once the .npy is in place, its ids are too.
            for tmp, target in reversed(self._temps):
                os.replace(tmp, target)
            fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.written

    def abort(self) -> None:
        """Drop the temp files (nothing under the final name changes)."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(Exception):
            self._close()
        for tmp, _ in self._temps:
            tmp.unlink(missing_ok=True)

    def _write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class _ParquetOutput(OutputFile):
    """Rows gathered into row groups of ``PARQUET_ROW_GROUP`` (fewer for wide vectors)."""

    def __init__(
        self, path: Path, dim: int, max_rows: int, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(path, dim, max_rows, metadata)
        self._pa, pq = pyarrow()  # fail before creating anything
        self._schema = self._pa.schema(
            [("id", self._pa.string()), ("embedding", self._pa.list_(self._pa.float32(), dim))],
            metadata=None if metadata is None else {PARQUET_META_KEY: orjson.dumps(metadata)},
        )
        self._group = max(1, min(PARQUET_ROW_GROUP, _PARQUET_ROW_GROUP_BYTES // max(4 * dim, 1)))
        self._ids: list[str] = []
        self._buf = np.empty((self._group, dim), dtype="<f4")
        # No dictionary encoding: unique ids and float vectors gain nothing from it, and it
        # costs time and memory. Vectors are neither compressed nor given min/max statistics:
        # float32 embeddings do not compress (snappy: 0% smaller), and per-element min/max
        # helps no query; both cost CPU (~20% of writing the file).
        self._writer = pq.ParquetWriter(
            self._temp(path),
            self._schema,
            use_dictionary=False,
            compression={"id": "snappy", "embedding": "none"},
            write_statistics=["id"],
        )

    def _write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        k = 0
        while k < len(ids):
            have = len(self._ids)
            take = min(self._group - have, len(ids) - k)
            self._buf[have : have + take] = vectors[k : k + take]
            self._ids.extend(ids[k : k + take])
            k += take
            if len(self._ids) == self._group:
                self._flush()

    def _flush(self) -> None:
        pa, n = self._pa, len(self._ids)
        flat = pa.array(self._buf[:n].reshape(-1), type=pa.float32())
        table = pa.Table.from_arrays(
            [
                pa.array(self._ids, type=pa.string()),
                pa.FixedSizeListArray.from_arrays(flat, self.dim),
            ],
            schema=self._schema,
        )
        self._writer.write_table(table, row_group_size=self._group)
        self._ids = []

    def _close(self) -> None:
        try:
            if self._ids:
                self._flush()
        finally:
            self._writer.close()


class _NpyOutput(OutputFile):
    """A float32 (rows, dim) array and ``<stem>.ids.txt``. The header is written for
    ``max_rows`` and rewritten, padded to the same length, with the rows actually written.
    (``open_memmap`` would map the whole array into the process, and every page it touches
    counts in RSS: 3 GB for 1M x 768.)"""

    def __init__(
        self, path: Path, dim: int, max_rows: int, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(path, dim, max_rows, metadata)
        self._header_len = len(_npy_header(max_rows, dim))
        self._file = open(self._temp(path), "wb", buffering=1 << 20)  # noqa: SIM115
        self._ids = open(  # noqa: SIM115
            self._temp(npy_ids_path(path)), "w", encoding="utf-8", newline="\n", buffering=1 << 20
        )
        self._file.write(_npy_header(max_rows, dim))

    def _write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        for rid in ids:
            if "\n" in rid or "\r" in rid:
                raise CorpusError(
                    f"id {rid!r} contains a line break, which the .ids.txt sidecar cannot hold; "
                    "write .parquet or .jsonl instead",
                    path=npy_ids_path(self.path),
                )
        self._file.write(np.ascontiguousarray(vectors, dtype="<f4").data)
        self._ids.write("".join(f"{rid}\n" for rid in ids))

    def _close(self) -> None:
        try:
            if not self._file.closed:
                self._file.seek(0)
                self._file.write(_npy_header(self.written, self.dim, self._header_len))
        finally:
            self._file.close()
            self._ids.close()


def _npy_header(rows: int, dim: int, length: int | None = None) -> bytes:
    """A .npy (format 1.0) header for a float32 (rows, dim) array, padded with spaces to
    ``length`` bytes if given (the format allows any padding before the final newline)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
    )
    header = buf.getvalue()
    if length is None or length == len(header):
        return header
    if length < len(header) or length - 10 > 0xFFFF:
        raise ValueError(f"a .npy header of {len(header)} bytes cannot fill {length}")
    body = header[10:-1] + b" " * (length - len(header)) + b"\n"
    return header[:8] + (length - 10).to_bytes(2, "little") + body


class _JsonlOutput(OutputFile):
    """One ``{"id": ..., "embedding": [...]}`` per line."""

    def __init__(
        self, path: Path, dim: int, max_rows: int, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(path, dim, max_rows, metadata)
        self._file = open(self._temp(path), "wb", buffering=1 << 20)  # noqa: SIM115

    def _write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._file.write(
            b"".join(
                orjson.dumps({"id": rid, "embedding": vectors[k]}, option=option)
                for k, rid in enumerate(ids)
            )
        )

    def _close(self) -> None:
        self._file.close()


def _row_vector(path: Path, rid: str, vector: np.ndarray, dim: int) -> np.ndarray:
    vec = np.asarray(vector, dtype="<f4")
    if vec.shape != (dim,):
        raise CorpusError(f"id {rid!r}: vector shape {vec.shape}, expected ({dim},)", path=path)
    return vec
