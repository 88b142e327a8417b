"""The .npz files dlntorch writes (trajectory.npz above all): zip64 archives of .npy members,
written here rather than through zipfile, and the one rule for which members are deflated.

Why by hand: zipfile computes a member's CRC and deflates it as its bytes pass through one
`write` on one thread, always into the archive's next bytes. A finished run's trajectory.npz
(165 MB at B = 4096) is made from its row file in place (trajectory.py): most members' data
already lies where the archive needs it, so only the headers, the deflated members, the members
behind them (moved down) and the directory are written — and the CRCs, deflate probes and
deflation of all members run on a small thread pool (zlib releases the GIL) while the writer
places them. np.load (zipfile) reads these archives as any other npz.

The format (PKWARE's APPNOTE): per member a local header (with a zip64 extra field: sizes are
never capped at 4 GB), its bytes (the .npy header and the array's C-order bytes, stored or raw
deflate), then the central directory, the zip64 end record, its locator and the end record.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy

DEFLATE_SAMPLE = 1 << 10     # elements in each of the 8 pieces of an array that `deflates` tries
DEFLATE_LEVEL = 1            # zlib's fastest: ~5x level 6's speed on these arrays, within ~10 % of its size
COPY_BYTES = 1 << 22         # one write of a member's bytes (a memory-mapped source is paged in as it goes)
WORKERS = 2                  # CRC and deflate threads (this lab's machines: 2 cores and up)

LOCAL = struct.Struct("<IHHHHHIIIHH")                 # local file header
LOCAL_ZIP64 = struct.Struct("<HHQQ")                  # its zip64 extra: uncompressed, compressed size
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")         # central directory header
CENTRAL_ZIP64 = struct.Struct("<HHQQQ")               # its zip64 extra: sizes and the local header's offset
END64 = struct.Struct("<IQHHIIQQQQ")                  # zip64 end of central directory record
LOCATOR64 = struct.Struct("<IIQI")                    # zip64 end of central directory locator
END = struct.Struct("<IHHHHIIH")                      # end of central directory record
ZIP64_VERSION = 45                                    # "version needed to extract": zip64
STORED, DEFLATED = 0, 8
FULL = 0xFFFF_FFFF                                    # "see the zip64 extra field"


def local_header_size(name: str) -> int:
    """Bytes of a member's local header (its zip64 extra included) for the array `name`."""
    return LOCAL.size + len(entry_name(name)) + LOCAL_ZIP64.size


def entry_name(name: str) -> bytes:
    return f"{name}.npy".encode()


def npy_header(dtype: np.dtype, shape: Sequence[int], size: int | None = None) -> bytes:
    """The .npy (version 1.0) header of a C-order array, padded with spaces to `size` bytes (a
    slot fixed before the array's length is known) or, as numpy pads it, to a multiple of 64."""
    text = repr({"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(n) for n in shape)})
    prefix = len(npy.MAGIC_PREFIX) + 2 + 2            # magic, version (1, 0), header length
    if size is None:
        size = -(-(prefix + len(text) + 1) // 64) * 64
    if prefix + len(text) + 1 > size or size - prefix > 0xFFFF:
        raise ValueError(f"the .npy header {text} does not fit in {size} bytes")
    return npy.MAGIC_PREFIX + bytes([1, 0]) + struct.pack("<H", size - prefix) + \
        text.encode("latin1").ljust(size - prefix - 1) + b"\n"


def compressible(data, ratio: float = 0.5) -> bool:
    """Whether deflate (level 1) shrinks the bytes `data` to `ratio` of their size or less."""
    return len(zlib.compress(data, DEFLATE_LEVEL)) <= ratio * len(data)


def always_deflated(nbytes: int) -> bool:
    """An array this small is deflated without a trial (no smaller than the 8 pieces tried)."""
    return nbytes <= 8 * DEFLATE_SAMPLE * 8


def deflates(array: np.ndarray, ratio: float = 0.5) -> bool:
    """Whether deflate (level 1) at least halves `array`, judged from 8 pieces spread over it
    (the early and the late rows of a trajectory differ). It does for flags, ranks and counts, and
    for whole trajectories of a few hundred replicas (converged ones repeat within deflate's 32 KB
    window); it does not for rows of thousands of replicas of float64 noise. Small arrays: always."""
    raw = array.reshape(-1).view(np.uint8)
    return judged(raw.size, array.dtype.itemsize, lambda begin, size: raw[begin:begin + size].tobytes(), ratio)


def judged(nbytes: int, itemsize: int, read, ratio: float = 0.5) -> bool:
    """`deflates` of an array of `nbytes` bytes whose bytes `read(begin, size)` returns."""
    if always_deflated(nbytes):
        return True
    starts = np.linspace(0, nbytes // itemsize - DEFLATE_SAMPLE, 8).astype(np.int64)
    return compressible(b"".join(read(int(s) * itemsize, DEFLATE_SAMPLE * itemsize) for s in starts), ratio)


@dataclass
class Member:
    """One array of an archive: its name, its .npy header, its dtype, and its data's `nbytes`
    bytes (C order): an array in memory (`data`), or the bytes at `offset` of the file `fd`, read
    in pieces of COPY_BYTES, each mapped alone (a huge B's member is gigabytes, which one map would
    add to the process's resident memory while it is read); `at`: where the destination file
    already holds them (None: nowhere)."""
    name: str
    header: bytes
    dtype: np.dtype
    nbytes: int
    data: np.ndarray | None = None
    fd: int | None = None
    offset: int = 0
    at: int | None = None

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> Member:
        return cls(name, npy_header(array.dtype, array.shape), array.dtype, array.nbytes, data=array)

    def read(self, begin: int, size: int) -> bytes:
        if self.data is not None:
            return self.data.reshape(-1).view(np.uint8)[begin:begin + size].tobytes()
        return os.pread(self.fd, size, self.offset + begin)

    def pieces(self):
        """The data in pieces of at most COPY_BYTES (a file's through a map of that piece alone,
        unmapped before the next: the page cache's own pages, no copy, and no fresh memory)."""
        if self.data is not None:
            raw = memoryview(self.data.reshape(-1).view(np.uint8))
            yield from (raw[b:b + COPY_BYTES] for b in range(0, self.nbytes, COPY_BYTES))
            return
        yield from file_pieces(self.fd, self.offset, self.nbytes)

    def deflates(self) -> bool:
        return judged(self.nbytes, self.dtype.itemsize, self.read)


def packed(member: Member) -> tuple[int, bytes | None]:
    """The member's CRC-32 (of its .npy header and data) and, where deflating pays (`deflates`),
    its raw deflate stream (None: stored)."""
    crc = zlib.crc32(member.header)
    packer = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15) if member.deflates() else None  # raw deflate
    stream = [] if packer is None else [packer.compress(member.header)]
    for piece in member.pieces():
        crc = zlib.crc32(piece, crc)
        if packer is not None:
            stream.append(packer.compress(piece))
    if packer is None:
        return crc, None
    stream.append(packer.flush())
    size = sum(len(s) for s in stream)
    return crc, (b"".join(stream) if size < len(member.header) + member.nbytes else None)


def file_pieces(fd: int, offset: int, nbytes: int):
    """The `nbytes` bytes at `offset` of the file `fd` in pieces of at most COPY_BYTES, each a view
    of a map of that piece alone (valid until the next)."""
    for begin in range(0, nbytes, COPY_BYTES):
        yield from mapped(fd, offset + begin, min(COPY_BYTES, nbytes - begin))


def write_pieces(fd: int, pieces, offset: int) -> None:
    """The bytes of `pieces`, one after another, from `offset` of the file `fd`."""
    for piece in pieces:
        write_at(fd, piece, offset)
        offset += len(piece)


def mapped(fd: int, offset: int, size: int):
    """Yield the `size` bytes at `offset` of the file `fd` as a read-only view of a map of them
    (valid until the generator resumes: then unmapped)."""
    skip = offset % mmap.ALLOCATIONGRANULARITY
    window = mmap.mmap(fd, skip + size, access=mmap.ACCESS_READ, offset=offset - skip)
    view = memoryview(window)[skip:]
    try:
        yield view
    finally:
        view.release()
        window.close()


def write_at(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def read_into(fd: int, buffer, offset: int) -> None:
    """Fill `buffer` with the file's bytes from `offset` (an error if the file ends first)."""
    view = memoryview(buffer).cast("B")
    while view:
        done = os.preadv(fd, [view], offset)
        if done == 0:
            raise OSError(f"the file ends before byte {offset + len(view)}")
        view, offset = view[done:], offset + done


def write_members(fd: int, members: Sequence[Member], start: int = 0,
                  directory: Iterable[str] | None = None) -> int:
    """Write `members` one after another from byte `start` of the file `fd`, then the central
    directory (listing them in the order of the names `directory`, default theirs); returns the
    archive's end. In place (a member's `at` set): the file must hold each member's data at or
    after where the member goes, and no member's data before an earlier member's; data already
    where it goes is not rewritten, and data behind a shorter member moves down."""
    stamp = dos_time()
    entries = {}
    cursor = start
    with ThreadPoolExecutor(max_workers=min(WORKERS, max(len(members), 1))) as pool:
        jobs = [pool.submit(packed, m) for m in members]        # ahead of the writer, in order
        for member, job in zip(members, jobs):
            crc, stream = job.result()
            size = len(member.header) + member.nbytes
            method, stored_size = (STORED, size) if stream is None else (DEFLATED, len(stream))
            name = entry_name(member.name)
            write_at(fd, LOCAL.pack(0x04034B50, ZIP64_VERSION, utf8(name), method, *stamp, crc, FULL, FULL,
                                    len(name), LOCAL_ZIP64.size) + name
                     + LOCAL_ZIP64.pack(0x0001, 16, size, stored_size), cursor)
            body = cursor + local_header_size(member.name)
            if stream is not None:
                write_at(fd, stream, body)
            else:
                write_at(fd, member.header, body)
                place(fd, member, body + len(member.header))
            entries[member.name] = (name, method, crc, size, stored_size, cursor - start)
            cursor = body + stored_size
    order = list(directory) if directory is not None else [m.name for m in members]
    return write_directory(fd, [entries[n] for n in order], cursor, start, stamp)


def place(fd: int, member: Member, offset: int) -> None:
    """The member's data at `offset` of the file: untouched if it already lies there, else copied
    in pieces. Moving down within one file, a piece is copied out of its map before it is written
    (the two ranges may overlap; the later pieces lie above what is written, so none is lost)."""
    if member.at == offset:
        return
    moved = member.at is not None
    write_pieces(fd, (bytes(piece) if moved else piece for piece in member.pieces()), offset)


def write_directory(fd: int, entries: list[tuple], cursor: int, start: int, stamp: tuple[int, int]) -> int:
    directory = b"".join(
        CENTRAL.pack(0x02014B50, (3 << 8) | ZIP64_VERSION, ZIP64_VERSION, utf8(name), method, *stamp, crc, FULL,
                     FULL, len(name), CENTRAL_ZIP64.size, 0, 0, 0, 0o644 << 16, FULL) + name
        + CENTRAL_ZIP64.pack(0x0001, 24, size, stored_size, offset)
        for name, method, crc, size, stored_size, offset in entries)
    where = cursor - start
    count = len(entries)
    tail = END64.pack(0x06064B50, END64.size - 12, (3 << 8) | ZIP64_VERSION, ZIP64_VERSION, 0, 0, count, count,
                      len(directory), where) \
        + LOCATOR64.pack(0x07064B50, 0, where + len(directory), 1) \
        + END.pack(0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), min(len(directory), FULL),
                   min(where, FULL), 0)
    write_at(fd, directory + tail, cursor)
    return cursor + len(directory) + len(tail)


def utf8(name: bytes) -> int:
    """The general-purpose flag: bit 11 where the member's name is not ASCII (it is UTF-8)."""
    return 0 if name.isascii() else 0x800


def dos_time() -> tuple[int, int]:
    year, month, day, hour, minute, second = time.localtime()[:6]
    return (hour << 11) | (minute << 5) | (second // 2), ((max(year, 1980) - 1980) << 9) | (month << 5) | day


def write_npz(handle, arrays: Mapping[str, np.ndarray]) -> None:
    """An .npz of `arrays` (np.load reads it) at the position of the binary file `handle`, each
    member deflated at level 1 only where that pays (`deflates`): a row of thousands of replicas'
    float64 observables shrinks by 5–20 % at ~25 MB/s (seconds at the end of such a run, for a
    file ~10 % smaller), flags and ranks 20-fold, a default run of 256 replicas about threefold."""
    members = []
    for name, array in arrays.items():
        array = np.asarray(array, order="C")      # (ascontiguousarray would make a 0-d array 1-d)
        if array.dtype.hasobject:
            raise ValueError(f"{name}: an object array has no .npy form without pickle")
        members.append(Member.of(name, array))
    write_archive(handle, members)


def write_archive(handle, members: Sequence[Member], directory: Iterable[str] | None = None) -> None:
    """`write_members` at the position of the binary file `handle`, which then stands at its end."""
    handle.flush()
    handle.seek(write_members(handle.fileno(), members, handle.tell(), directory))
