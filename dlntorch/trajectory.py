"""The logged rows of a run, streamed to disk: one row file during the run, laid out as the
trajectory.npz it becomes; trajectory.npz written from it at every checkpoint, and at the end
made from it in place.

A row (one logged time) is a dict of arrays: `step` and `t` (scalars) and each observable with
its replica axis, (B,) or (B, k) or (B, m, n). Kept in memory, 200 rows of ~30 numbers per
replica capped a 2x2 run at ~2e5 replicas in 8 GiB; here only the last row stays in memory.

The row file (`<run dir>/trajectory/rows.<capacity>`) holds a region per observable, sized for
`capacity` rows (the run's logged grid) and laid out as that observable's npz member: room for
its local zip header and its .npy header, then its rows' bytes in C order (so the region *is* the
array (T, B, …) without its headers). A row is one write per observable at its place; a crash or
SIGKILL leaves at most a partial last row, and the checkpoint records how many rows are its own:
a resumed run continues after them. At a checkpoint, trajectory.npz is written atomically
(temporary file, then rename) from the regions, so a reader never sees a half-written one. At
the end (`seal`) the row file itself becomes trajectory.npz: the headers written into their
slots, deflated members written over their regions and the members after them moved down,
the directory after the last, then the rename — the 165 MB of a B = 4096 run are not copied
again. The manifest names the file, the regions and the capacity; more rows than the capacity
(a run that logs off its grid) move the regions to a file of twice the capacity.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .logger import atomic_write_bytes
from .npzfile import (
    Member,
    always_deflated,
    compressible,
    file_pieces,
    local_header_size,
    npy_header,
    read_into,
    write_archive,
    write_at,
    write_members,
    write_npz,
    write_pieces,
)

MANIFEST = "manifest.json"      # the row file, its capacity and each observable's region
MIN_CAPACITY = 16               # rows of a trajectory whose length is not known ahead
PRIOR_BYTES = 1 << 16           # the first row's bytes that place an observable (see `_layout`)


class Trajectory:
    """The logged rows of one run, in the row file under `folder` (None: in memory only, for a
    trajectory read back from an npz), laid out for `capacity` rows (None: MIN_CAPACITY, doubled
    as needed). `len()` rows; `last` the last row (kept in memory)."""

    def __init__(self, folder: Path | None = None, capacity: int | None = None):
        self.folder = None if folder is None else Path(folder)
        self.capacity = int(capacity) if capacity else MIN_CAPACITY
        self.columns: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}   # name → (dtype, row shape)
        self.regions: dict[str, int] = {}         # name → where its region (local header) begins
        self.places: dict[str, tuple[int, int]] = {}   # name → where its rows begin, a row's bytes
        self.data: str | None = None              # the row file's name under `folder`
        self.count = 0
        self.last: dict[str, np.ndarray] | None = None
        self.sealed: Path | None = None           # trajectory.npz, once the row file became it
        self._fd: int | None = None
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
            if self.count == self.capacity:
                self._grow()
            for name in self.columns:      # C order: the bytes, uncopied, one write each
                write_at(self._fd, row[name].reshape(-1).view(np.uint8), self._offset(name, self.count))
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
            self._open(self._layout(row), self.capacity)
            self._write_manifest()

    def _layout(self, row: Mapping[str, np.ndarray]) -> list[str]:
        """The regions' order. At the end every member after the first deflated one moves down
        (`seal`), so: the largest first (multi-column observables, rarely compressible), those whose
        first row already deflates (flags, ranks, counts) last."""
        def key(name: str):
            value = row[name]
            small = always_deflated(value.nbytes * self.capacity)
            return small or compressible(value.reshape(-1).view(np.uint8)[:PRIOR_BYTES].tobytes()), -value.nbytes
        return sorted(row, key=key)

    def _slot(self, name: str) -> int:
        """The bytes before an observable's rows in its region: its local zip header and room for
        its .npy header at any length."""
        dtype, shape = self.columns[name]
        return local_header_size(name) + len(npy_header(dtype, (10 ** 15, *shape)))

    def _open(self, order: list[str], capacity: int) -> None:
        """A new row file for `capacity` rows, its regions in `order` (the caller then names it
        in the manifest)."""
        self.capacity, self.data, self.regions, begin = capacity, f"rows.{capacity}", {}, 0
        for name in order:
            self.regions[name] = begin
            begin += self._slot(name) + capacity * self._row_bytes(name)
        self._locate()
        self._fd = os.open(self.folder / self.data, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)

    def _grow(self) -> None:
        """Twice the capacity: the rows so far move to a new row file, which the manifest then names
        (a kill in between leaves the old one named and whole)."""
        old_fd, old, old_offsets = self._fd, self.data, {n: self._offset(n, 0) for n in self.columns}
        self._fd = None
        self._open(sorted(self.regions, key=self.regions.get), 2 * self.capacity)
        for name in self.columns:
            write_pieces(self._fd, file_pieces(old_fd, old_offsets[name], self.count * self._row_bytes(name)),
                         self._offset(name, 0))
        self._write_manifest()
        os.close(old_fd)
        (self.folder / old).unlink()

    def _drop(self, name: str) -> None:
        del self.columns[name]
        self.regions.pop(name, None)          # its region stays unused; `seal` moves the rest down
        self.places.pop(name, None)
        if self.folder is not None:
            self._write_manifest()
        for row in self._memory:
            row.pop(name, None)

    def _write_manifest(self, sealing: bool = False) -> None:
        text = json.dumps({"data": self.data, "capacity": self.capacity, "sealing": sealing,
                           "columns": {n: {"dtype": dt.str, "shape": list(shape), "region": self.regions[n]}
                                       for n, (dt, shape) in self.columns.items()}})
        atomic_write_bytes(self.folder / MANIFEST, lambda h: h.write(text.encode()))

    def _offset(self, name: str, row: int) -> int:
        """Where row `row` of observable `name` lies in the row file."""
        start, size = self.places[name]
        return start + row * size

    def _locate(self) -> None:
        """Each observable's first row's place in the row file and a row's bytes, from the regions
        (kept: `append` asks for every observable's at every row)."""
        self.places = {n: (begin + self._slot(n), self._row_bytes(n)) for n, begin in self.regions.items()}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove the row file (the run is complete: trajectory.npz holds every row)."""
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
        if self.sealed is not None:
            with np.load(self.sealed) as data:
                return data[name]
        if self.folder is None:
            return np.stack([row[name] for row in self._memory]) if self._memory else np.empty((0, *shape), dtype)
        out = np.empty((self.count, *shape), dtype)
        read_into(self._fd, out.reshape(-1).view(np.uint8), self._offset(name, 0))
        return out

    def _row(self, name: str, i: int) -> np.ndarray:
        dtype, shape = self.columns[name]
        out = np.empty(shape, dtype)
        read_into(self._fd, out.reshape(-1).view(np.uint8), self._offset(name, i))
        return out

    def replicas(self, name: str, chosen: slice) -> np.ndarray:
        """One observable for the replicas `chosen` (a slice of the replica axis) at every logged
        time, (T, b, …), read row by row: what per-replica summaries of a huge B hold at once."""
        dtype, shape = self.columns[name]
        if self.folder is None or self.sealed is not None or not shape:
            return self.array(name)[:, chosen] if shape else self.array(name)
        start, stop, _ = chosen.indices(shape[0])
        inner = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        out = np.empty((self.count, max(stop - start, 0), *shape[1:]), dtype)
        for i in range(self.count):
            read_into(self._fd, out[i].reshape(-1).view(np.uint8), self._offset(name, i) + start * inner)
        return out

    def arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The observables `names` (default: all) as arrays (T, B, …); names it lacks are left out."""
        chosen = self.columns if names is None else [n for n in names if n in self.columns]
        return {n: self.array(n) for n in chosen} if self.count else {}

    def members(self, in_place: bool = False) -> list[Member]:
        """The npz members of the rows so far, in the row file's order (`in_place`: each knows
        where its data already lies)."""
        header = {n: npy_header(dt, (self.count, *shape), self._slot(n) - local_header_size(n))
                  for n, (dt, shape) in self.columns.items()}
        return [Member(n, header[n], self.columns[n][0], self.count * self._row_bytes(n), fd=self._fd,
                       offset=self._offset(n, 0), at=self._offset(n, 0) if in_place else None)
                for n in sorted(self.columns, key=self.regions.get)]

    def save(self, path: Path) -> None:
        """trajectory.npz with every row so far, written atomically; the row file stays."""
        if self.folder is None or self.count == 0:
            arrays = self.arrays()
            atomic_write_bytes(path, lambda h: write_npz(h, arrays))
            return
        members = self.members()
        atomic_write_bytes(path, lambda handle: write_archive(handle, members, directory=self.columns))

    def seal(self, path: Path) -> None:
        """trajectory.npz made from the row file in place, then renamed to `path` (the run is
        complete: no row follows). The manifest says so first: a kill while the regions are
        rewritten leaves a row file that a resumed run does not trust (it rebuilds from the
        checkpoint's trajectory.npz). Reads then come from `path`."""
        if self.folder is None or self.count == 0:
            self.save(path)
            return
        self._write_manifest(sealing=True)
        end = write_members(self._fd, self.members(in_place=True), 0, directory=self.columns)
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        self.close()
        os.replace(self.folder / self.data, path)
        self.sealed = Path(path)

    # -- resuming -------------------------------------------------------------------------
    def restore(self, npz: Path, rows: int) -> None:
        """Continue after a checkpoint that counts `rows` rows as its own: the row file's rows past
        them (a crash may have left more, or a partial one) are overwritten as the run goes on, or,
        where the row file does not hold them (a run dir from before this layout, the file removed,
        or sealed), the row file is rebuilt from the npz."""
        self.close()
        self.count, self.last, self._memory, self.sealed = 0, None, [], None
        if rows == 0:
            self.columns = {}
            return
        if self.folder is None or not self._reopen(rows):
            with np.load(npz) as data:
                arrays = {key: data[key][:rows] for key in data.files}
            self.columns, self.capacity = {}, max(self.capacity, rows)
            for i in range(rows):
                self.append({key: value[i] for key, value in arrays.items()})
            return
        self.count = rows
        self.last = {name: self._row(name, rows - 1) for name in self.columns}

    def _reopen(self, rows: int) -> bool:
        """Open the row file the manifest names, if it holds `rows` rows of every observable."""
        manifest = self.folder / MANIFEST
        saved = json.loads(manifest.read_text()) if manifest.is_file() else {}
        if "data" not in saved or saved["sealing"] or rows > saved["capacity"] \
                or not (self.folder / saved["data"]).is_file():
            return False
        self.data, self.capacity = saved["data"], saved["capacity"]
        self.columns = {n: (np.dtype(c["dtype"]), tuple(c["shape"])) for n, c in saved["columns"].items()}
        self.regions = {n: c["region"] for n, c in saved["columns"].items()}
        self._locate()
        size = (self.folder / self.data).stat().st_size
        if any(self._offset(n, rows) > size for n in self.columns):
            self.columns, self.regions, self.places = {}, {}, {}
            return False
        self._fd = os.open(self.folder / self.data, os.O_RDWR)
        return True


def read_rows(path: Path, rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of a saved trajectory.npz, as arrays (T, B, …)."""
    if rows == 0:
        return {}
    with np.load(path) as data:
        return {key: data[key][:rows] for key in data.files}
