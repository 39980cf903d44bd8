"""A parallel `numpy.savez_compressed`: the same .npz, written 10x+ faster.

nnU-Net saves each case's softmax as `np.savez_compressed(f, probabilities=p)`, a (4, 340, 512,
512) float32 array (1.4 GB) deflated by zlib at level 6 on one core: about a minute a case.
`savez_compressed(fp, *args, threads=None, level=None, chunk_size=16 MiB, **arrays)` writes, to a
seekable binary file object, a file that `np.load(file)[key]` reads back bit for bit: same keys,
dtype, shape, values and array order (Fortran-contiguous arrays are stored Fortran order, like
numpy, everything else C order). Paths (numpy's '.npz' suffix, written atomically) are
nnunet_heart_ext/data/npz_file.py's, the project's file writing: this module only encodes.

Format. A standard zip (APPNOTE 6.3), as numpy writes it: per array a local header (Zip64 extra
always present, as numpy's force_zip64 does), member '<key>.npy' = the .npy header made by
`numpy.lib.format` followed by the raw array bytes, ZIP_DEFLATED; then the central directory
(Zip64 extra fields, and the Zip64 end records, only where a size, offset or count needs them).
`zipfile` cannot take data already compressed, so the records are written here with `struct`;
after the data the local header is rewritten with the CRC and sizes (as zipfile does on a
seekable file), so no data descriptor is needed.

Why faster. (1) ISA-L (`isal.isal_zlib`, level 1 by default; its deflate is several times faster
than zlib's) instead of zlib level 6, and (2) the payload is cut into independent chunks compressed
at the same time by a thread pool (both isal and zlib release the GIL), the strided copy of a
non-contiguous array done chunk by chunk in the same threads, in cache-sized blocks. Without isal the same chunking runs
on the standard `zlib` (level 1 by default).

Joining the chunks. A raw deflate stream is a sequence of blocks, the last one flagged BFINAL.
Each chunk gets a fresh compressor (no back-references into another chunk); all but the last end
with Z_FULL_FLUSH, which closes the current block without BFINAL and pads with an empty stored
block to a byte boundary, so the next chunk's first block starts on a byte: the concatenation is
one valid stream, and only the last chunk (Z_FINISH) sets BFINAL. The zip CRC-32 of the whole is
combined from the chunks' CRCs: with CRC as polynomial arithmetic over GF(2) modulo the CRC-32
polynomial P, crc(A || B) = crc(A) * x^(8 |B|) mod P  xor  crc(B) (zlib's crc32_combine; the
pre/post inversions cancel), where x^(8 |B|) mod P is built by square-and-multiply from a table
of x^(2^k) mod P. Sizes add.
"""
import io
import struct
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib import format as npformat

from nnunet_heart_ext.kernels.cores import usable_cores

CHUNK_SIZE = 16 << 20
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes/offsets above this need Zip64 fields (tests lower it)
_POLY = 0xEDB88320  # CRC-32, reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo P, both reflected 32-bit polynomials, a != 0."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod P
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A || B from crc1 = crc32(A), crc2 = crc32(B) and len2 = len(B)."""
    p, k = 1 << 31, 3  # x^0; the exponent is 8 * len2 = len2 * 2^3
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def _zlib_module():
    try:
        from isal import isal_zlib
        return isal_zlib
    except ImportError:
        return zlib  # same chunking, slower deflate


def _pieces(a: np.ndarray, chunk_size: int):
    """Views of `a` whose C-order bytes, in order, are a's C-order bytes; each <= chunk_size bytes
    (unless one item is larger): whole sub-arrays along the axis where rows first fit."""
    if a.ndim == 0 or a.nbytes <= chunk_size:
        yield a
        return
    ax, row = a.ndim - 1, a.itemsize
    while ax > 0 and row * a.shape[ax] <= chunk_size:
        row *= a.shape[ax]
        ax -= 1
    step = max(1, chunk_size // row)
    for idx in np.ndindex(*a.shape[:ax]):
        for s in range(0, a.shape[ax], step):
            yield a[idx + (slice(s, s + step),)]


def _payload(val, allow_pickle: bool, chunk_size: int):
    """The .npy member as a sequence of arrays (numpy's header, then the data in file order)."""
    arr = np.asanyarray(val)
    d = npformat.header_data_from_array_1_0(arr)
    if not arr.dtype.hasobject and getattr(type(arr.dtype), "_legacy", True):
        header = io.BytesIO()
        try:
            try:
                npformat.write_array_header_1_0(header, d)
            except ValueError:  # header longer than 65535 bytes
                header = io.BytesIO()
                npformat.write_array_header_2_0(header, d)
        except ValueError:  # needs format 3.0 (utf-8 field names): numpy's own writer, in memory
            pass
        else:
            data = np.asarray(arr)
            yield np.frombuffer(header.getvalue(), np.uint8)
            yield from _pieces(data.T if d["fortran_order"] else data, chunk_size)
            return
    buf = io.BytesIO()  # pickled object arrays and the rest: numpy's .npy bytes, then chunked
    npformat.write_array(buf, arr, allow_pickle=allow_pickle)
    yield from _pieces(np.frombuffer(buf.getbuffer(), np.uint8), chunk_size)


def _c_order(piece: np.ndarray) -> np.ndarray:
    """`piece` in C order. A strided piece is copied in blocks of ~64 KiB along its axis of largest
    stride, so each block reads a small part of memory: copied whole, a transposed view re-reads
    each cache line from RAM once per output row (3x slower on nnU-Net's probabilities)."""
    if piece.flags.c_contiguous:
        return piece
    out = np.empty(piece.shape, piece.dtype)
    ax = int(np.argmax(np.abs(piece.strides)))
    step = max(1, (64 << 10) * piece.shape[ax] // piece.nbytes)
    idx = [slice(None)] * piece.ndim
    for s in range(0, piece.shape[ax], step):
        idx[ax] = slice(s, s + step)
        out[tuple(idx)] = piece[tuple(idx)]
    return out


def _compress(piece: np.ndarray, last: bool, zl, level: int):
    data = _c_order(piece).reshape(-1).view(np.uint8)
    c = zl.compressobj(level, zl.DEFLATED, -15)
    return (c.compress(data), c.flush(zl.Z_FINISH if last else zl.Z_FULL_FLUSH)), zl.crc32(data), data.size


def _local_header(name: bytes, flags: int, dostime: int, dosdate: int, crc: int, usize: int, csize: int) -> bytes:
    extra = struct.pack("<HHQQ", 1, 16, usize, csize)
    return struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 45, 0, flags, 8, dostime, dosdate, crc,
                       0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra)) + name + extra


def _write_zip(fp, arrays: dict, pool, threads: int, zl, level: int, chunk_size: int, allow_pickle: bool):
    base = fp.tell()
    t = time.localtime()
    dostime = t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2
    dosdate = (t.tm_year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday
    entries = []
    for key, val in arrays.items():
        name = (key + ".npy").encode("utf-8")
        flags = 0 if name.isascii() else 0x800
        offset = fp.tell() - base
        fp.write(_local_header(name, flags, dostime, dosdate, 0, 0, 0))
        crc = usize = csize = 0
        pending = deque()

        def drain():
            nonlocal crc, usize, csize
            parts, c, n = pending.popleft().result()
            for part in parts:
                fp.write(part)
                csize += len(part)
            crc, usize = crc32_combine(crc, c, n), usize + n

        try:
            it = _payload(val, allow_pickle, chunk_size)
            nxt = next(it)
            while nxt is not None:
                piece, nxt = nxt, next(it, None)
                pending.append(pool.submit(_compress, piece, nxt is None, zl, level))
                if len(pending) >= 2 * threads:
                    drain()
            while pending:
                drain()
        finally:
            for f in pending:
                f.cancel()
        end = fp.tell()
        fp.seek(base + offset)
        fp.write(_local_header(name, flags, dostime, dosdate, crc, usize, csize))
        fp.seek(end)
        entries.append((name, flags, crc, csize, usize, offset))

    cd_offset = fp.tell() - base
    for name, flags, crc, csize, usize, offset in entries:
        big = [v for v in (usize, csize, offset) if v > _ZIP64_LIMIT]
        extra = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) if big else b""
        usize, csize, offset = (v if v <= _ZIP64_LIMIT else 0xFFFFFFFF for v in (usize, csize, offset))
        version = 45 if big else 20
        fp.write(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", version, 3, version, 0, flags, 8, dostime,
                             dosdate, crc, csize, usize, len(name), len(extra), 0, 0, 0, 0o600 << 16, offset)
                 + name + extra)
    cd_end = fp.tell() - base
    cd_size, n = cd_end - cd_offset, len(entries)
    if n >= 0xFFFF or cd_size > _ZIP64_LIMIT or cd_offset > _ZIP64_LIMIT:
        fp.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_offset))
        fp.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, cd_end, 1))
        n, cd_size, cd_offset = min(n, 0xFFFF), min(cd_size, 0xFFFFFFFF), 0xFFFFFFFF
    fp.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, cd_size, cd_offset, 0))


def savez_compressed(fp, *args, threads: int = None, level: int = None, chunk_size: int = CHUNK_SIZE,
                     allow_pickle: bool = True, **kwds) -> None:
    """`numpy.savez_compressed(fp, *args, **kwds)`, in parallel, into `fp`: a seekable binary file
    object, written from where it stands (for a path: nnunet_heart_ext.data.npz_file). `threads`:
    default the usable cores; `level`: deflate level (default 1; isal takes 0-3, zlib 0-9);
    `chunk_size`: bytes of array data per compressed chunk (extra memory: at most ~4 x threads x
    chunk_size). The keyword names above cannot name arrays (pass such arrays positionally or rename)."""
    if not hasattr(fp, "write"):
        raise TypeError(f"kernels.npz.savez_compressed writes to a binary file object, not {fp!r}: for a path use "
                        "nnunet_heart_ext.data.npz_file.savez_compressed")
    arrays = dict(kwds)
    for i, val in enumerate(args):
        if f"arr_{i}" in arrays:
            raise ValueError(f"Cannot use un-named variables and keyword arr_{i}")
        arrays[f"arr_{i}"] = val
    threads = usable_cores() if threads is None else threads
    threads, chunk_size = max(1, int(threads)), max(1, int(chunk_size))
    zl = _zlib_module()
    level = 1 if level is None else level
    with ThreadPoolExecutor(threads, thread_name_prefix="npz") as pool:
        _write_zip(fp, arrays, pool, threads, zl, level, chunk_size, allow_pickle)
