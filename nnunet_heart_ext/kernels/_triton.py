"""Triton where it imports, a clear error where it does not; imported only when asked for.

Triton is installed on Linux only (setup.py), and a kernel module must still import where it is
absent (macOS, Windows, a CPU-only image): its CPU path works there. Kernel modules take
`triton`, `tl` and `AVAILABLE` from here and keep ordinary Triton code: without Triton, `triton`
and `tl` are stand-ins on which every attribute exists (so `@triton.jit` and `tl.constexpr`
annotations evaluate at import), and launching a kernel raises `TritonUnavailable`.

`import triton` happens on the first access to `triton`, `tl`, `AVAILABLE` or `REASON` (module
`__getattr__`), not when this module is imported: code that only asks `INTERPRET`, or only runs
its CPU path, never imports Triton (about 0.15 s, and where it is broken, an error).

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


def _load() -> dict:
    try:
        import triton
        import triton.language as tl

        return {"triton": triton, "tl": tl, "AVAILABLE": True, "REASON": ""}
    except ImportError as error:  # pragma: no cover - depends on the machine
        reason = f"triton does not import ({error})"
        missing = _Missing(reason)
        return {"triton": missing, "tl": missing, "AVAILABLE": False, "REASON": reason}


def __getattr__(name):
    if name in ("triton", "tl", "AVAILABLE", "REASON"):
        globals().update(_load())  # later lookups find the module globals directly
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
