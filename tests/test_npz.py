"""nnunet_heart_ext.kernels.npz.savez_compressed (paths: nnunet_heart_ext.data.npz_file): files that
np.load (and nnU-Net) read exactly as np.savez_compressed's, on fresh random inputs, with small chunk
sizes so that many chunks and every branch of the zip writer run in well under a second each."""
import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from nnunet_heart_ext.data import npz_file
from nnunet_heart_ext.kernels import npz

rng = np.random.default_rng()


def check(tmp_path, *args, **arrays):
    """Write with both writers, compare what np.load gives: keys, dtype, shape, bytes, order."""
    kw = {k: arrays.pop(k) for k in ("threads", "chunk_size", "level") if k in arrays}
    ours, ref = tmp_path / "ours.npz", tmp_path / "ref.npz"
    npz_file.savez_compressed(ours, *args, **kw, **arrays)
    np.savez_compressed(ref, *args, **arrays)
    with np.load(ours, allow_pickle=True) as a, np.load(ref, allow_pickle=True) as b:
        assert a.files == b.files
        for key in b.files:
            x, y = a[key], b[key]
            assert (x.dtype, x.shape) == (y.dtype, y.shape), key
            assert (x.flags.c_contiguous, x.flags.f_contiguous) == (y.flags.c_contiguous, y.flags.f_contiguous)
            if x.dtype.hasobject:
                assert x.tolist() == y.tolist()
            else:
                assert x.tobytes() == y.tobytes(), key  # bit for bit, NaNs included
    with zipfile.ZipFile(ours) as zf, open(ours, "rb") as f:
        assert zf.testzip() is None  # every member inflates and matches its CRC-32
        for info in zf.infolist():  # the rewritten local header agrees with the central directory
            f.seek(info.header_offset)
            fields = struct.unpack("<4s2B4HL2L2H", f.read(30))
            f.seek(fields[10], 1)
            extra = struct.unpack("<HHQQ", f.read(fields[11]))
            assert (fields[0], fields[7], extra[2], extra[3]) == (b"PK\x03\x04", info.CRC, info.file_size,
                                                                   info.compress_size)
            assert info.compress_type == zipfile.ZIP_DEFLATED
    return ours


def transposed_probabilities(shape):
    """Softmax-like float32 (C, Z, Y, X), a non-contiguous view the way nnU-Net exports it."""
    c, z, y, x = shape
    p = rng.random((c, y, x, z), dtype=np.float32)
    p /= p.sum(0, keepdims=True)
    return p.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("chunk_size", [1, 1000, 4096, 1 << 20, npz.CHUNK_SIZE])
def test_transposed_float32_probabilities(tmp_path, chunk_size):
    p = transposed_probabilities((4, 13, 17, 11))
    assert not p.flags.c_contiguous and not p.flags.f_contiguous
    check(tmp_path, probabilities=p, chunk_size=chunk_size)


def test_many_chunks_every_axis(tmp_path):
    """Chunks split along axes 0-3 (and odd sizes, not multiples of the chunk), many threads."""
    p = transposed_probabilities((4, 37, 29, 23))
    for chunk_size in (12345, 4 * 23 * 5 + 3, 4 * 23 * 29 * 3, 4 * 23 * 29 * 37 + 1, 77):
        check(tmp_path, probabilities=p, chunk_size=chunk_size, threads=5)
    check(tmp_path, probabilities=p[:, ::2, 3:, ::-1], chunk_size=999, threads=1)


@pytest.mark.parametrize("axes", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
def test_blocked_copy_every_transpose(tmp_path, axes):
    """Pieces of ~200 KB copied in ~64 KiB blocks, whichever axis has the largest stride."""
    base = rng.normal(size=(40, 50, 61))[:, :, :60]  # not contiguous under any transpose
    check(tmp_path, a=base.transpose(axes), chunk_size=200_000, threads=2)


def test_fortran_and_c_order(tmp_path):
    f2 = np.asfortranarray(rng.normal(size=(37, 53)))
    f4 = np.asfortranarray(rng.random((3, 5, 7, 11), dtype=np.float32))
    assert f4.flags.f_contiguous and not f4.flags.c_contiguous
    check(tmp_path, f2=f2, f4=f4, c=np.ascontiguousarray(f4), chunk_size=100)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.float16, np.int64, ">i4", np.complex64, "M8[s]", "U3"])
def test_dtypes_several_keys_positional(tmp_path, dtype):
    a = rng.integers(0, 200, size=(3, 41, 7)).astype(dtype)
    check(tmp_path, a, a.T, key=a[1], zero_d=a[0, 0, 0].copy().reshape(()), chunk_size=64)


def test_zero_d_empty_nan_and_unicode_names(tmp_path):
    x = rng.normal(size=1000).astype(np.float32)
    x[::7] = np.nan
    x[::11] = np.inf
    check(tmp_path, scalar=np.float64(3.5), zero_d=np.array(7, np.int8), empty=np.zeros((0,), np.float32),
          empty3=np.empty((3, 0, 5)), nan=x, **{"μ-probabilités": x[:10]}, chunk_size=128)


def test_object_arrays_and_structured(tmp_path):
    obj = np.array([{"a": 1}, [1, 2], "x", None], dtype=object)
    rec = np.zeros(50, dtype=[("a", "<f4"), ("b", "i2", (3,))])
    rec["a"] = rng.random(50)
    check(tmp_path, obj=obj, rec=rec, chunk_size=16)
    with pytest.raises(ValueError, match="allow_pickle"):
        npz_file.savez_compressed(tmp_path / "o.npz", obj=obj, allow_pickle=False)


def test_larger_than_one_chunk_default_threads(tmp_path):
    p = transposed_probabilities((4, 40, 64, 64))  # 2.6 MB: 10 chunks of 256 KiB
    check(tmp_path, probabilities=p, chunk_size=256 << 10)


def test_crc32_combine():
    for n1, n2 in [(0, 0), (1, 0), (0, 5), (1000, 1), (12345, 100000), (3, 1 << 20)]:
        a, b = os.urandom(n1), os.urandom(n2)
        assert npz.crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)


def test_zip64_fields(tmp_path, monkeypatch):
    """Sizes and offsets above the Zip64 limit (lowered here) go into Zip64 extra fields and the
    Zip64 end records, which zipfile (hence np.load) then reads."""
    monkeypatch.setattr(npz, "_ZIP64_LIMIT", 500)
    ours = check(tmp_path, a=rng.random(3000), b=np.arange(10), c=rng.random(800), chunk_size=1000)
    data = ours.read_bytes()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data


def test_npz_suffix_and_file_objects(tmp_path):
    x = rng.random(100)
    npz_file.savez_compressed(str(tmp_path / "case"), probabilities=x)
    npz_file.savez_compressed(tmp_path / "other.npz", probabilities=x)
    assert sorted(os.listdir(tmp_path)) == ["case.npz", "other.npz"]
    np.testing.assert_array_equal(np.load(tmp_path / "case.npz")["probabilities"], x)
    buf = io.BytesIO(b"junk")  # a file object, written from where it stands
    buf.seek(4)
    npz_file.savez_compressed(buf, x, chunk_size=100)
    np.testing.assert_array_equal(np.load(io.BytesIO(buf.getvalue()[4:]))["arr_0"], x)
    with pytest.raises(ValueError, match="arr_0"):
        npz_file.savez_compressed(tmp_path / "c", x, arr_0=x)
    with pytest.raises(TypeError, match="npz_file"):  # the kernel encodes into file objects only
        npz.savez_compressed(tmp_path / "d.npz", x)
    assert not (tmp_path / "d.npz").exists()


class Unconvertible:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("cannot make an array")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "case.npz"
    np.savez_compressed(target, probabilities=np.arange(5))
    before = target.read_bytes()
    p = transposed_probabilities((4, 9, 8, 7))
    with pytest.raises(RuntimeError, match="cannot make"):  # second key fails, the first is written
        npz_file.savez_compressed(target, probabilities=p, bad=Unconvertible(), chunk_size=100)
    calls = []

    def failing(piece, last, zl, level):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return compress(piece, last, zl, level)

    compress = npz._compress
    monkeypatch.setattr(npz, "_compress", failing)  # a worker thread fails mid-file
    with pytest.raises(OSError, match="disk full"):
        npz_file.savez_compressed(target, probabilities=p, chunk_size=100, threads=3)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        npz_file.savez_compressed(tmp_path / "missing" / "case.npz", probabilities=p)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["case.npz"]  # no temporary left behind


def test_zlib_fallback(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import isal_zlib` -> ImportError
    assert npz._zlib_module() is zlib
    check(tmp_path, probabilities=transposed_probabilities((4, 11, 13, 9)), f=np.asfortranarray(rng.random((9, 8))),
          chunk_size=300, threads=3)


def test_imports_and_writes_without_isal(tmp_path):
    code = ("import sys; sys.modules['isal'] = None\n"
            "import numpy as np\n"
            "from nnunet_heart_ext.data import npz_file\n"
            f"npz_file.savez_compressed({str(tmp_path / 'x')!r}, probabilities=np.arange(10.0))\n"
            f"assert np.load({str(tmp_path / 'x.npz')!r})['probabilities'].sum() == 45\n"
            "assert 'torch' not in sys.modules and 'nnunetv2' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nnunet_average_probabilities(tmp_path):
    """nnU-Net's ensembling reader gives the same average on files from either writer."""
    from nnunetv2.ensembling.ensemble import average_probabilities
    probs = [transposed_probabilities((4, 12, 20, 16)) for _ in range(2)]
    ours, ref = [], []
    for i, p in enumerate(probs):
        ours.append(str(tmp_path / f"ours_{i}.npz"))
        ref.append(str(tmp_path / f"ref_{i}.npz"))
        npz_file.savez_compressed(ours[-1], probabilities=p, chunk_size=500)
        np.savez_compressed(ref[-1], probabilities=p)
    a, b = average_probabilities(ours), average_probabilities(ref)
    assert a.dtype == b.dtype == np.float32 and a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(a, (probs[0] + probs[1]) / np.float32(2))
