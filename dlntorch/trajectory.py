"""The logged rows of a run, streamed to disk: append-only row files during the run,
trajectory.npz assembled from them at every checkpoint and at the end.

A row (one logged time) is a dict of arrays: `step` and `t` (scalars) and each observable with
its replica axis, (B,) or (B, k) or (B, m, n). Kept in memory, 200 rows of ~30 numbers per
replica capped a 2x2 run at ~2e5 replicas in 8 GiB; here only the last row stays in memory.

Why row files and not an npz written as it goes: an npz member is one deflated stream per
observable, which cannot grow by a row without being rewritten; a raw file per observable
(`<run dir>/trajectory/<name>.rows`, the rows' bytes in C order, so the file *is* the array
(T, B, …) without its header) grows by an append. A crash or SIGKILL leaves at most a partial last
row; the checkpoint records how many rows are its own, and a resumed run cuts every file back to
that count. trajectory.npz is written atomically (temporary file, then rename) from the files,
one observable and one chunk at a time, so the analysis code reads the same npz as before and a
reader never sees a half-written one. At the end, once summary.json is written, the row files go.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from .logger import atomic_write_bytes, npz_member, write_npz

MANIFEST = "manifest.json"      # names, dtypes and row shapes, in the rows' order
CHUNK_BYTES = 1 << 22           # what one read of a row file holds in memory while assembling


class Trajectory:
    """The logged rows of one run, in the row files under `folder` (None: in memory only, for a
    trajectory read back from an npz). `len()` rows; `last` the last row (kept in memory)."""

    def __init__(self, folder: Path | None = None):
        self.folder = None if folder is None else Path(folder)
        self.columns: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}   # name → (dtype, row shape)
        self.count = 0
        self.last: dict[str, np.ndarray] | None = None
        self._files: dict[str, object] = {}
        self._memory: list[dict[str, np.ndarray]] = []   # folder None

    def __len__(self) -> int:
        return self.count

    # -- writing --------------------------------------------------------------------------
    def append(self, row: Mapping[str, np.ndarray]) -> None:
        row = {k: np.asarray(v, order="C") for k, v in row.items()}
        if self.count == 0:
            self._start(row)
        # a name missing from a row leaves the trajectory (as an npz keeps only complete arrays)
        for name in [n for n in self.columns if n not in row]:
            self._drop(name)
        if self.folder is None:
            self._memory.append({n: row[n] for n in self.columns})
        else:
            for name in self.columns:
                self._file(name).write(memoryview(row[name]).cast("B"))     # C order: the bytes, uncopied
        self.count += 1
        self.last = dict(row)

    def _start(self, row: Mapping[str, np.ndarray]) -> None:
        """The first row fixes the names, dtypes and shapes; the files of an earlier attempt go."""
        self.close()
        self.columns = {k: (v.dtype, v.shape) for k, v in row.items()}
        if self.folder is not None:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            self._write_manifest()

    def _drop(self, name: str) -> None:
        del self.columns[name]
        handle = self._files.pop(name, None)
        if handle is not None:
            handle.close()
        if self.folder is not None:
            self._path(name).unlink(missing_ok=True)
            self._write_manifest()
        for row in self._memory:
            row.pop(name, None)

    def _write_manifest(self) -> None:
        text = json.dumps({n: {"dtype": dt.str, "shape": list(shape)} for n, (dt, shape) in self.columns.items()})
        atomic_write_bytes(self.folder / MANIFEST, lambda h: h.write(text.encode()))

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.rows"

    def _file(self, name: str):
        if name not in self._files:
            # unbuffered: each row reaches the file in one write (a kill loses no complete row)
            self._files[name] = open(self._path(name), "ab", buffering=0)   # noqa: SIM115 — open while it logs
        return self._files[name]

    def flush(self) -> None:
        """The rows appended so far reach the files (before they are read)."""
        for handle in self._files.values():
            handle.flush()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def discard(self) -> None:
        """Remove the row files (the run is complete: trajectory.npz holds every row)."""
        self.close()
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)

    # -- reading --------------------------------------------------------------------------
    def _row_bytes(self, name: str) -> int:
        dtype, shape = self.columns[name]
        return dtype.itemsize * int(np.prod(shape, dtype=np.int64))

    def array(self, name: str) -> np.ndarray:
        """One observable at every logged time, (T, B, …)."""
        dtype, shape = self.columns[name]
        if self.folder is None:
            return np.stack([row[name] for row in self._memory]) if self._memory else np.empty((0, *shape), dtype)
        self.flush()
        with open(self._path(name), "rb") as handle:
            data = np.fromfile(handle, dtype=dtype, count=self.count * int(np.prod(shape, dtype=np.int64)))
        return data.reshape(self.count, *shape)

    def _row(self, name: str, i: int) -> np.ndarray:
        dtype, shape = self.columns[name]
        with open(self._path(name), "rb") as handle:
            handle.seek(i * self._row_bytes(name))
            return np.frombuffer(handle.read(self._row_bytes(name)), dtype=dtype).reshape(shape).copy()

    def replicas(self, name: str, chosen: slice) -> np.ndarray:
        """One observable for the replicas `chosen` (a slice of the replica axis) at every logged
        time, (T, b, …), read row by row: what per-replica summaries of a huge B hold at once."""
        dtype, shape = self.columns[name]
        if self.folder is None or not shape:
            return self.array(name)[:, chosen] if shape else self.array(name)
        start, stop, _ = chosen.indices(shape[0])
        inner = int(np.prod(shape[1:], dtype=np.int64))
        out = np.empty((self.count, max(stop - start, 0), *shape[1:]), dtype)
        self.flush()
        with open(self._path(name), "rb") as handle:
            for i in range(self.count):
                handle.seek(i * self._row_bytes(name) + start * inner * dtype.itemsize)
                out[i] = np.frombuffer(handle.read(out[i].nbytes), dtype=dtype).reshape(out.shape[1:])
        return out

    def arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The observables `names` (default: all) as arrays (T, B, …); names it lacks are left out."""
        chosen = self.columns if names is None else [n for n in names if n in self.columns]
        return {n: self.array(n) for n in chosen} if self.count else {}

    def save(self, path: Path) -> None:
        """trajectory.npz with every row so far, written atomically, one chunk in memory at a time."""
        if self.folder is None:
            arrays = self.arrays()
            atomic_write_bytes(path, lambda h: write_npz(h, arrays))
            return
        self.flush()
        atomic_write_bytes(path, self._write_npz)

    def _write_npz(self, handle) -> None:
        # as logger.write_npz (deflated where that pays), each member streamed from its row file
        # one buffer for every read: a fresh 16 MB per read cost as much in page faults as the copy
        chunk = memoryview(bytearray(CHUNK_BYTES))
        with zipfile.ZipFile(handle, "w") as archive:     # each member's kind and level: npz_member
            for name, (dtype, shape) in self.columns.items():
                header = {"descr": npy.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": (self.count, *shape)}
                left = self.count * self._row_bytes(name)
                rows_so_far = np.memmap(self._path(name), dtype=dtype, mode="r", shape=(self.count, *shape))
                entry = npz_member(name, rows_so_far)      # judged from 8 pieces of the row file
                del rows_so_far
                with archive.open(entry, "w", force_zip64=True) as member, \
                        open(self._path(name), "rb") as rows:
                    npy.write_array_header_2_0(member, header)
                    while left > 0:
                        read = rows.readinto(chunk[:min(CHUNK_BYTES, left)])
                        if not read:
                            raise OSError(f"{self._path(name)} holds fewer than {self.count} rows")
                        member.write(chunk[:read])
                        left -= read

    # -- resuming -------------------------------------------------------------------------
    def restore(self, npz: Path, rows: int) -> None:
        """Continue after a checkpoint that counts `rows` rows as its own: the row files cut back
        to them (a crash may have left more, or a partial one), or, where the files do not hold
        them (a run dir from before the row files, or the files removed), rebuilt from the npz."""
        self.close()
        self.count, self.last, self._memory = 0, None, []
        if rows == 0:
            self.columns = {}
            return
        if self.folder is None or not self._cut_back(rows):
            with np.load(npz) as data:
                arrays = {key: data[key][:rows] for key in data.files}
            self.columns = {}
            for i in range(rows):
                self.append({key: value[i] for key, value in arrays.items()})
            return
        self.count = rows
        self.last = {name: self._row(name, rows - 1) for name in self.columns}

    def _cut_back(self, rows: int) -> bool:
        """Truncate every row file to `rows` rows; False if any is missing or shorter."""
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            return False
        columns = {n: (np.dtype(c["dtype"]), tuple(c["shape"])) for n, c in json.loads(manifest.read_text()).items()}
        self.columns = columns
        sizes = {n: rows * self._row_bytes(n) for n in columns}
        if any(not self._path(n).is_file() or self._path(n).stat().st_size < size for n, size in sizes.items()):
            self.columns = {}
            return False
        for name, size in sizes.items():
            with open(self._path(name), "r+b") as handle:
                handle.truncate(size)
        return True


def read_rows(path: Path, rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of a saved trajectory.npz, as arrays (T, B, …)."""
    if rows == 0:
        return {}
    with np.load(path) as data:
        return {key: data[key][:rows] for key in data.files}
