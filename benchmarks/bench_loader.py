"""The training loader's cost in the main process: CPU seconds a batch with loader workers.

With `nnUNet_n_proc_DA` workers, the training process itself still receives every batch: it
unpickles what the workers put on batchgenerators' queue (and, on a GPU, pins it) in its results
thread, under the GIL, beside the training step. Issue 21 measured HeartTrainer at 1.26x its
compute-only bound on an H100 with 4 workers and suspected this cost.

Rows (full-size phantom cases with HeartPlans, as `bench_augment`; CPU trainers, so no pinning):
the process time of the main process (all its threads) over `--loader-batches` batches after 8
warm-up batches, divided by the batches, for nnU-Net's loader (nnUNetTrainer: augmented patches,
pickled inline), HeartTrainer's loader as it was (the augmentation parameters sent as ~20 small
tensors, each a shared-memory segment and a file descriptor the main process receives and maps)
and as it is (the parameters as numpy arrays, pickled inline; the boxes stay tensors).

`python -m benchmarks --only loader [--loader-workers 4] [--loader-batches 40]`
"""
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_augment import build_dataset, make_trainer, point_nnunet_at, shut_down
from benchmarks.common import RESULTS_DIR, report


def add_arguments(parser):
    parser.add_argument("--loader-workers", type=int, default=4, help="nnUNet_n_proc_DA")
    parser.add_argument("--loader-batches", type=int, default=40, help="batches timed per row")
    parser.add_argument("--loader-repeats", type=int, default=3, help="rows of each loader, interleaved")


def main_process_seconds(cls, params_as_numpy: bool, batches: int) -> dict:
    from nnunet_heart_ext.trainers import device_augmentation

    device_augmentation.HeartDataLoader.send_params_as_numpy = params_as_numpy
    trainer = make_trainer(cls, "cpu")
    trainer.initialize()
    loader, val = trainer.get_dataloaders()
    try:
        for _ in range(8):
            next(loader)
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(loader)
        cpu, wall = (time.process_time() - c0) / batches, (time.perf_counter() - w0) / batches
    finally:
        shut_down(loader, val)
        device_augmentation.HeartDataLoader.send_params_as_numpy = True
    return {"main_cpu_s_per_batch": cpu, "wall_s_per_batch": wall}


def main(args):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_heart_ext.trainers import HeartTrainer

    quick = getattr(args, "quick", False)
    workers = getattr(args, "loader_workers", 4)
    batches = 5 if quick else getattr(args, "loader_batches", 40)
    repeats = 1 if quick else getattr(args, "loader_repeats", 3)
    root = Path(getattr(args, "augment_data", Path.home() / ".cache" / "nnunet-heart-ext" / "bench_augment"))
    point_nnunet_at(root)
    build_dataset(root, 1 if quick else 2)
    os.environ["nnUNet_n_proc_DA"] = str(workers)
    variants = [("nnU-Net's loader (nnUNetTrainer)", nnUNetTrainer, True),
                ("HeartTrainer, parameters as tensors (before)", HeartTrainer, False),
                ("HeartTrainer, parameters as numpy (now)", HeartTrainer, True)]
    samples = {name: [] for name, _, _ in variants}
    for _ in range(repeats):  # interleaved, so that a busy moment hits every variant
        for name, cls, as_numpy in variants:
            samples[name].append(main_process_seconds(cls, as_numpy, batches))
            print(name, samples[name][-1], flush=True)
    rows = []
    for name, _, _ in variants:
        cpu = [s["main_cpu_s_per_batch"] for s in samples[name]]
        wall = [s["wall_s_per_batch"] for s in samples[name]]
        rows.append({"loader": name, "workers": workers, "main_cpu_ms_per_batch_median": 1e3 * float(np.median(cpu)),
                     "main_cpu_ms_min": 1e3 * min(cpu), "main_cpu_ms_max": 1e3 * max(cpu),
                     "wall_ms_per_batch_median": 1e3 * float(np.median(wall)), "repeats": repeats,
                     "batches": batches})
    before = rows[1]["main_cpu_ms_per_batch_median"]
    for row in rows:
        row["vs_before"] = before / row["main_cpu_ms_per_batch_median"]

    def plot(rows, ax):
        ax.barh([r["loader"] for r in rows], [r["main_cpu_ms_per_batch_median"] for r in rows], color="tab:blue")
        ax.set_xlabel("main-process CPU ms a batch (median)")
        ax.tick_params(axis="y", labelsize=7)

    report("loader", rows, title=f"main-process CPU a training batch, {workers} loader workers", plot=plot,
           results_dir=getattr(args, "out", None) or RESULTS_DIR,
           extra={"quick": quick, "data": str(root), "samples": samples,
                  "notes": "process time of the training process (all threads) over the timed batches; "
                           "CPU trainers, so batchgenerators does not pin memory"})
