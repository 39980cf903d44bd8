"""A stand-in for nnU-Net's preprocessor in tests/test_ensemble_prefetch.py: importable by the
spawned preprocessing workers (they get the tests' sys.path) and light (numpy only), so that the
prefetching is tested in seconds. The case N_0000.nii.gz (no file is read) becomes an array of
N x the model's `factor`; earlier cases take longer, so that later ones are ready first. The
model's `fail` ("raise" or "die") happens at the case numbered `at`; with `log`, each call leaves a
file in that folder."""
import os
import signal
import time
from pathlib import Path

import numpy as np


class Config:
    """A configuration manager with only the preprocessor class (pickled to the workers)."""

    def __init__(self, preprocessor_class=None):
        self.preprocessor_class = preprocessor_class or Preprocessor


class Preprocessor:
    def __init__(self, verbose: bool = False):
        pass

    def run_case(self, files, seg, plans_manager, configuration_manager, dataset_json):
        n = int(Path(files[0]).name.split("_")[0])
        if dataset_json.get("at") == n:
            if dataset_json.get("fail") == "raise":
                raise OSError(f"cannot read {files[0]}")
            if dataset_json.get("fail") == "die":
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(dataset_json.get("delay", 0.0) * max(0, 4 - n))
        if "log" in dataset_json:  # one file a call: how often each case was preprocessed for the model
            Path(dataset_json["log"], f"{n}-{dataset_json['factor']}-{os.getpid()}-{time.monotonic_ns()}").touch()
        return (np.full((1, 2, 2, 2), n * dataset_json["factor"], np.float32), None,
                {"case": n, "pid": os.getpid()})
