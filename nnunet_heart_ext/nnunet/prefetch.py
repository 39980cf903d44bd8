"""Cases preprocessed for each model ahead of the network, in spawned worker processes
(predict-ensemble, ensemble_predict.py), as nnU-Net's predictor preprocesses ahead of its own
(nnunetv2/inference/data_iterators.py).

`Prefetch(models, cases, workers=N)` yields `(files, [(data, properties) per model])` in the order
of `cases`. Each case is preprocessed once per model (nnU-Net's preprocessor of that model's plans:
the models may differ in spacing and normalisation), by a pool of N processes of a 'spawn'
context (no fork of a process holding a CUDA context), while the caller predicts the case before:
at most CASES_AHEAD cases beyond the one handed out are submitted, so at most (1 + CASES_AHEAD)
cases' inputs per model are in memory. N = 0 preprocesses each case here, when it is asked for
(in series with the network). Default N: nnU-Net's default_num_processes (8, or
$nnUNet_def_n_proc), at most the usable cores; never more than there are inputs to prepare at once.

Errors. A worker's exception becomes a PreprocessingError naming the case's files and the model;
a worker that dies (killed, out of memory) breaks the pool, and the error names the cases that
were being preprocessed; either way at once, never a hang. The same exception of the
preprocessor in this process (N = 0) gives the same error. Closing (the `with` block's end, on
success or error) ends the pool: its workers are joined after the last case, terminated when
cases are left, so that no process outlives the command; a worker whose command was killed
(SIGKILL: nothing closes) ends itself.
"""
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Deque, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# Cases submitted beyond the one being predicted (nnU-Net's iterator: one queued per worker).
CASES_AHEAD = 2


class PreprocessingError(RuntimeError):
    """A case that could not be preprocessed; the message names its files (and the model)."""


@dataclass(frozen=True)
class Model:
    """What preprocessing needs of a model (pickled once to each worker)."""
    name: str  # the model folder, for messages
    plans_manager: Any
    configuration_manager: Any
    dataset_json: dict


def preprocess(model: Model, files: Sequence[str]) -> Tuple[np.ndarray, dict]:
    """The case's network input and properties for this model: nnU-Net's preprocessor of its plans."""
    preprocessor = model.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case(list(files), None, model.plans_manager,
                                                model.configuration_manager, model.dataset_json)
    return data, properties


def default_workers() -> int:
    from nnunetv2.configuration import default_num_processes

    return max(1, min(default_num_processes, len(os.sched_getaffinity(0))))


_worker_models: Optional[List[Model]] = None  # a worker's models, set once by _start_worker


def _start_worker(models: List[Model]) -> None:
    global _worker_models
    _worker_models = models
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_with_parent, args=(parent.sentinel,), daemon=True).start()


def _end_with_parent(sentinel) -> None:
    """A worker outlives no command: one killed (SIGKILL, no close()) takes its workers along."""
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _work(index: int, files: Sequence[str]) -> Tuple[np.ndarray, dict]:
    return preprocess(_worker_models[index], files)


def _failed(files: Sequence[str], model: Model, e: BaseException) -> PreprocessingError:
    return PreprocessingError(f"preprocessing {', '.join(files)} for {model.name} failed: "
                              f"{type(e).__name__}: {e}")


class Prefetch:
    """See the module docstring. Use as a context manager (or call close())."""

    def __init__(self, models: Sequence[Model], cases: Sequence[Sequence[str]], *, workers: int,
                 ahead: int = CASES_AHEAD):
        if workers < 0:
            raise ValueError(f"Prefetch: workers must be >= 0, not {workers}")
        if ahead < 1:
            raise ValueError(f"Prefetch: ahead must be >= 1, not {ahead}")
        self.models, self.cases, self.ahead = list(models), [list(c) for c in cases], ahead
        self.workers = min(workers, len(self.cases) * len(self.models), (1 + ahead) * len(self.models))
        self._pool: Optional[ProcessPoolExecutor] = None
        self._pending: Deque[Tuple[List[str], list]] = deque()
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.models,))

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[Tuple[List[str], List[Tuple[np.ndarray, dict]]]]:
        if self._pool is None:
            for files in self.cases:
                inputs = []
                for model in self.models:
                    try:
                        inputs.append(preprocess(model, files))
                    except Exception as e:
                        raise _failed(files, model, e) from e
                yield files, inputs
            return
        upcoming = iter(self.cases)
        while True:
            while len(self._pending) < 1 + self.ahead:
                files = next(upcoming, None)
                if files is None:
                    break
                try:  # a worker that died since the last case breaks the pool: submit raises
                    futures = [self._pool.submit(_work, i, files) for i in range(len(self.models))]
                except BrokenProcessPool as e:
                    raise self._broken() from e
                self._pending.append((files, futures))
            if not self._pending:
                return
            files, futures = self._pending[0]
            inputs = [self._result(files, model, future) for model, future in zip(self.models, futures)]
            self._pending.popleft()
            yield files, inputs

    def _result(self, files: List[str], model: Model, future) -> Tuple[np.ndarray, dict]:
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise self._broken() from e
        except Exception as e:
            raise _failed(files, model, e) from e

    def _broken(self) -> PreprocessingError:
        in_flight = "; ".join(", ".join(f) for f, _ in self._pending)
        return PreprocessingError(f"a preprocessing worker ended abruptly (killed, or out of memory?) while "
                                  f"these cases were being preprocessed: {in_flight}")

    def close(self) -> None:
        """End the pool: join its workers when every case was handed out, terminate them otherwise."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if not self._pending:
            pool.shutdown(wait=True)
            return
        # Cases left (an error here or in the caller): their workers are not waited for. The pool
        # has no public way to stop a running task, so its processes are terminated here.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for _, futures in self._pending:
            for future in futures:
                future.cancel()
        self._pending.clear()
        for process in processes:
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
