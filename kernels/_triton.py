"""Triton where it imports, a clear error where it does not.

Triton is installed on Linux only (setup.py), and a kernel module must still import where it is
absent (macOS, Windows, a CPU-only image): its CPU path works there. Kernel modules take
`triton`, `tl` and `AVAILABLE` from here and keep ordinary Triton code: without Triton, `triton`
and `tl` are stand-ins on which every attribute exists (so `@triton.jit` and `tl.constexpr`
annotations evaluate at import), and launching a kernel raises `TritonUnavailable`.

`INTERPRET` mirrors TRITON_INTERPRET=1, which Triton reads when a kernel is decorated: CPU
tensors then run the kernels through Triton's interpreter (how CI tests them).
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonUnavailable(RuntimeError):
    """A Triton kernel was asked for where Triton does not import."""


class _Missing:
    """Stands in for `triton` and `triton.language` when Triton does not import."""

    def __init__(self, reason: str):
        self._reason = reason

    def __getattr__(self, name):
        return self

    def __call__(self, fn=None, *args, **kwargs):
        if callable(fn) and not args and not kwargs:  # @triton.jit
            return _MissingKernel(fn.__name__, self._reason)
        return self

    def __repr__(self):
        return f"<Triton unavailable: {self._reason}>"


class _MissingKernel:
    def __init__(self, name: str, reason: str):
        self.__name__ = name
        self._reason = reason

    def __getitem__(self, grid):
        raise TritonUnavailable(f"Triton kernel {self.__name__} cannot run: {self._reason}")

    __call__ = __getitem__


try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    REASON = ""
except ImportError as error:  # pragma: no cover - depends on the machine
    AVAILABLE = False
    REASON = f"triton does not import ({error})"
    triton = tl = _Missing(REASON)
