"""`.npz` files as numpy writes them, to a path, atomically: the parallel writer
(nnunet_heart_ext.kernels.npz, which only encodes into a file object) behind the project's
atomic file writing (nnunet_heart_ext.data.files.replace_atomically).

`savez_compressed(file, *args, threads=None, level=None, chunk_size=..., **arrays)` takes what
`numpy.savez_compressed` takes: a path ('.npz' appended when missing; its folder must exist, as
for numpy) or a seekable binary file object. A path is written under a temporary name in the
hidden partial folder beside it and then moved into place: a failure leaves the previous file as
it was and no temporary behind.
"""
import errno
import os
from pathlib import Path

from nnunet_heart_ext.data.files import replace_atomically
from nnunet_heart_ext.kernels import npz


def savez_compressed(file, *args, **kwargs) -> None:
    """`numpy.savez_compressed(file, *args, **arrays)` on the parallel writer; keyword options as
    nnunet_heart_ext.kernels.npz.savez_compressed (threads, level, chunk_size, allow_pickle)."""
    if hasattr(file, "write"):
        npz.savez_compressed(file, *args, **kwargs)
        return
    path = Path(os.fspath(file))
    if not path.name.endswith(".npz"):
        path = path.with_name(path.name + ".npz")
    if not path.parent.is_dir():  # numpy's behaviour (replace_atomically would create the folder)
        raise FileNotFoundError(errno.ENOENT, "No such directory", str(path.parent))

    def write(tmp):
        with open(tmp, "wb", buffering=1 << 20) as f:
            npz.savez_compressed(f, *args, **kwargs)

    replace_atomically(write, path)
