"""HDF5 files built in memory and written as one ordinary file write.

HDF5's own disk I/O fails badly on a full disk or a read-only folder: the error surfaces from
deep inside the library, and the half-closed objects it leaves print tracebacks when they are
collected. So shards and assets are built with the core (memory) driver and their bytes are
written through `pipeline.files.writing` (a temporary name, then a rename), where a failed
write is one clean error.

The core driver lays a file out exactly as the default (sec2) driver does, byte for byte, with
one exception, seen with HDF5 1.14: `get_file_image` on an open file returns a version-3
superblock whose fields are those of the closed file but whose checksum is not (it was computed
for the superblock of the file while open). `file_image` recomputes it (Jenkins' lookup3, HDF5's
metadata checksum), so the bytes are those the file would have on disk once closed; a test
checks that against a file written by the default driver.
"""

from __future__ import annotations

import uuid

import h5py

_MASK = 0xFFFFFFFF
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SUPERBLOCK_V3 = 3
# Version-3 superblock with 8-byte addresses: 44 bytes, then the 4-byte checksum.
_SB_SIZE = 44
_FLAGS = 11  # the superblock's file consistency flags


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    for r1, r2, r3 in ((4, 6, 8), (16, 19, 4)):
        a = ((a - c) & _MASK) ^ _rot(c, r1)
        c = (c + b) & _MASK
        b = ((b - a) & _MASK) ^ _rot(a, r2)
        a = (a + c) & _MASK
        c = ((c - b) & _MASK) ^ _rot(b, r3)
        b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c = ((c ^ b) - _rot(b, 14)) & _MASK
    a = ((a ^ c) - _rot(c, 11)) & _MASK
    b = ((b ^ a) - _rot(a, 25)) & _MASK
    c = ((c ^ b) - _rot(b, 16)) & _MASK
    a = ((a ^ c) - _rot(c, 4)) & _MASK
    b = ((b ^ a) - _rot(a, 14)) & _MASK
    return ((c ^ b) - _rot(b, 24)) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 `hashlittle`, as HDF5 checksums its metadata."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _MASK
    i = 0
    while n - i > 12:
        w = [int.from_bytes(data[i + j : i + j + 4], "little") for j in (0, 4, 8)]
        a, b, c = _mix((a + w[0]) & _MASK, (b + w[1]) & _MASK, (c + w[2]) & _MASK)
        i += 12
    if n - i == 0:
        return c
    tail = data[i:].ljust(12, b"\0")
    w = [int.from_bytes(tail[j : j + 4], "little") for j in (0, 4, 8)]
    return _final((a + w[0]) & _MASK, (b + w[1]) & _MASK, (c + w[2]) & _MASK)


def memory_file(fcpl: h5py.h5p.PropFCID, fapl: h5py.h5p.PropFAID, size_hint: int = 0) -> h5py.File:
    """A new HDF5 file in memory (never written by HDF5 itself). size_hint: the bytes it will
    likely hold, so that its buffer is allocated once rather than grown step by step."""
    fapl.set_fapl_core(max(1 << 20, size_hint), False)
    name = f"memory-{uuid.uuid4().hex}.h5".encode()
    return h5py.File(h5py.h5f.create(name, h5py.h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl))


def file_image(f: h5py.File) -> tuple[bytes, memoryview]:
    """The bytes of an open in-memory file as they would be on disk once it is closed, as
    (the superblock with its checksum fixed, the rest): two pieces, so that the image (the size
    of a whole shard) is not copied again."""
    f.flush()
    image = f.id.get_file_image()
    if image[:8] != _SIGNATURE or image[8] != _SUPERBLOCK_V3 or image[9] != 8:
        raise ValueError("unexpected HDF5 superblock in a file image")
    head = bytearray(image[:_SB_SIZE])
    head[_FLAGS] = 0  # "open for writing" (and SWMR) flags: a closed file has none
    checksum = lookup3(bytes(head)).to_bytes(4, "little")
    return bytes(head) + checksum, memoryview(image)[_SB_SIZE + 4 :]
