"""Shared fixtures. Triton kernels are tested on the CPU through its interpreter, so
TRITON_INTERPRET=1 must be set before anything imports triton: it is set here, first.
NNUNET_HEART_EXT_STRICT=1: a fault of the extension's inference or export raises instead of
falling back to nnU-Net's code (nnunet_heart_ext/nnunet/fallback.py), so that no test hides one;
subprocesses inherit it. tests/test_fallback.py switches it off where it tests the fallback."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NNUNET_HEART_EXT_STRICT", "1")

import pytest  # noqa: E402


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """Empty nnUNet_raw/_preprocessed/_results folders, set in the environment (subprocesses
    inherit them). nnunetv2.paths reads them at import, so in-process code must re-read them."""
    dirs = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in dirs.items():
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    return dirs
