"""The training data path: nnU-Net's loader + CPU transforms against HeartTrainer's loader (load and
cut only) + the device augmentation, on full-size phantom cases preprocessed with HeartPlans
(3d_fullres patch and batch size of the plan).

Data: `benchmarks/data/HeartPlans_fullsize.json` is what `nnUNetv2_plan_and_preprocess -pl
HeartPlanner` planned for a full-size phantom (`nnunet-heart phantom --full-size --train 3`, seed
0). The cases are rebuilt from the same phantom seed with those plans (synth_case ->
HeartPreprocessor.run_case_npy -> nnU-Net's blosc2 dataset), no image files involved, so the same
data is made on a machine without SimpleITK (the GPU machine); kept under --augment-data.

CPU (always), one process: the CPU seconds (process time, all threads) of next() on each trainer's
training loader from get_dataloaders() with nnUNet_n_proc_DA=0, loaders in turn each round;
then the device augmentation of HeartTrainer's batches on this CPU (seconds a batch).
CUDA (when there is one): the device augmentation's time a batch (host boxes in, augmented batch
and targets out); training iterations a second of nnUNetTrainer, HeartTrainer_nnUNetDA and
HeartTrainer with nnUNet_n_proc_DA workers, against each trainer's compute-only bound (its
train_step on one batch held on the device, as nnU-Net's noDataLoading trainers do). The network
is not compiled (nnUNet_compile=f) in any row, so the rows compare like with like.
`python -m benchmarks --only augment [--quick]`.
"""
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, print_table, report

PLANS_FILE = Path(__file__).resolve().parent / "data" / "HeartPlans_fullsize.json"
DATASET_JSON = Path(__file__).resolve().parent / "data" / "dataset_fullsize.json"
DATASET = "Dataset100_Heart"
CONFIGURATION = "3d_fullres"


def add_arguments(parser):
    parser.add_argument("--augment-data", type=Path, default=Path.home() / ".cache" / "nnunet-heart-ext" / "bench_augment",
                        help="where the preprocessed full-size phantom is kept (made when missing)")
    parser.add_argument("--augment-cases", type=int, default=2, help="full-size cases to make")
    parser.add_argument("--augment-rounds", type=int, default=20, help="CPU: batches timed per loader")
    parser.add_argument("--augment-workers", default="4,12,2", help="CUDA: nnUNet_n_proc_DA values")
    parser.add_argument("--augment-steps", type=int, default=15, help="CUDA: timed training steps per row")
    parser.add_argument("--augment-budget-s", type=float, default=240,
                        help="CUDA: start no new training row after this many seconds")


# ------------------------------------------------------------------ data
def build_dataset(root: Path, n_cases: int, seed: int = 0) -> Path:
    """nnUNet_preprocessed/Dataset100_Heart with HeartPlans and `n_cases` full-size phantom cases
    under `root` (reused when complete). Returns the preprocessed dataset folder."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_heart_ext.data.phantom import synth_case
    from nnunet_heart_ext.nnunet.preprocessing import HeartPreprocessor

    plans = json.loads(PLANS_FILE.read_text())
    dataset_json = json.loads(DATASET_JSON.read_text())
    folder = root / "nnUNet_preprocessed" / DATASET
    cases = folder / plans["configurations"][CONFIGURATION]["data_identifier"]
    names = [f"patient{case:04d}" for case in range(1, n_cases + 1)]
    if all((cases / f"{name}.pkl").is_file() for name in names):
        return folder
    cases.mkdir(parents=True, exist_ok=True)
    (folder / "nnUNetPlans.json").unlink(missing_ok=True)
    (folder / f"{plans['plans_name']}.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    preprocessor = HeartPreprocessor(verbose=False)
    for case, name in enumerate(names, start=1):
        started = time.perf_counter()
        image, label, spacing = synth_case(np.random.default_rng([seed, case]), False, case == 1, True)
        data, seg, properties = preprocessor.run_case_npy(image[None].astype(np.float32), label[None].astype(np.int16),
                                                          {"spacing": list(spacing)}, manager, configuration,
                                                          dataset_json)
        data, seg = data.astype(np.float32, copy=False), seg.astype(np.int16, copy=False)
        patch = tuple(configuration.patch_size)
        block, chunk = comp_blosc2_params(data.shape, patch, data.itemsize)
        block_seg, chunk_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, properties, str(cases / name), chunks=chunk, blocks=block,
                                      chunks_seg=chunk_seg, blocks_seg=block_seg)
        print(f"bench_augment: {name} {tuple(image.shape)} -> {tuple(data.shape[1:])} "
              f"[{time.perf_counter() - started:.1f} s]", flush=True)
    return folder


def point_nnunet_at(root: Path):
    """nnU-Net's folders (nnunetv2 2.8 reads them from the environment when it needs them)."""
    for name in ("nnUNet_preprocessed", "nnUNet_results", "nnUNet_raw"):
        (root / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / name)


def make_trainer(cls, device):
    plans = json.loads(PLANS_FILE.read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training adds before building a trainer
    dataset_json = json.loads(DATASET_JSON.read_text())
    return cls(plans, CONFIGURATION, "all", dataset_json, device=torch.device(device))


def trainer_classes():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_heart_ext.trainers import HeartTrainer, HeartTrainer_nnUNetDA
    return {"nnUNetTrainer": nnUNetTrainer, "HeartTrainer_nnUNetDA": HeartTrainer_nnUNetDA,
            "HeartTrainer": HeartTrainer}


def shut_down(*loaders):
    for loader in loaders:
        if hasattr(loader, "_finish"):
            loader._finish()


# ------------------------------------------------------------------ CPU: the loaders
def cpu_rows(rounds: int, extra: dict) -> list:
    classes = trainer_classes()
    os.environ["nnUNet_n_proc_DA"] = "0"
    loaders, trainers = {}, {}
    for name in ("nnUNetTrainer", "HeartTrainer"):
        trainers[name] = make_trainer(classes[name], "cpu")
        trainers[name].initialize()  # batch size and oversampling are set there
        loaders[name], _ = trainers[name].get_dataloaders()  # nnU-Net draws one batch in there
    heart = trainers["HeartTrainer"]
    extra["patch_size"] = list(heart.configuration_manager.patch_size)
    extra["batch_size"] = heart.batch_size
    extra["enlarged_patch"] = [int(i) for i in loaders["HeartTrainer"].data_loader.patch_size]
    cpu, wall, batches = {name: [] for name in loaders}, {name: [] for name in loaders}, []
    for _ in range(rounds):
        for name, loader in loaders.items():
            c0, w0 = time.process_time(), time.perf_counter()
            batch = next(loader)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
            if name == "HeartTrainer":
                batches.append(batch)
    augment_cpu = []
    for batch in batches:  # the device augmentation of those batches, here on the CPU
        c0 = time.process_time()
        heart.augmentation.apply_boxes(batch["data"], batch["target"], batch["offsets"], batch["enlarged_shape"],
                                       batch["params"])
        augment_cpu.append(time.process_time() - c0)
    box_voxels = [sum(d[0].numel() for d in b["data"]) for b in batches]
    extra["heart_box_voxels_per_batch_median"] = float(np.median(box_voxels))
    extra["spatial_samples_share"] = float(np.mean([np.mean(b["params"]["spatial"]) for b in batches]))
    # the mean is the cost per batch over a run (the transforms that fire vary from batch to batch)
    base = float(np.mean(cpu["nnUNetTrainer"]))
    rows = [{"device": "cpu", "path": f"{name} loader next() (nnUNet_n_proc_DA=0)",
             "cpu_s_per_batch": float(np.mean(cpu[name])), "cpu_s_median": float(np.median(cpu[name])),
             "wall_s_per_batch": float(np.mean(wall[name])), "vs_nnunet": base / float(np.mean(cpu[name])),
             "batches": rounds} for name in loaders]
    rows.append({"device": "cpu", "path": f"device augmentation on the CPU ({torch.get_num_threads()} threads)",
                 "cpu_s_per_batch": float(np.mean(augment_cpu)), "cpu_s_median": float(np.median(augment_cpu)),
                 "wall_s_per_batch": None, "vs_nnunet": None, "batches": len(augment_cpu)})
    shut_down(*loaders.values())
    return rows


# ------------------------------------------------------------------ CUDA: training speed
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(trainer, next_batch, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        trainer.train_step(next_batch())
    _sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next_batch())  # ends with loss.cpu(): synchronised
    return steps / (time.perf_counter() - t0)


def cuda_rows(workers: list, steps: int, budget_s: float, extra: dict, device: str = "cuda", warmup: int = 3) -> list:
    """Training rows (on `device`; "cpu" only to try the code path)."""
    classes = trainer_classes()
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else device
    os.environ["nnUNet_compile"] = "f"
    rows, started = [], time.perf_counter()
    bounds = {}
    # compute-only bound and the augmentation's time, per trainer, on one batch held on the device
    os.environ["nnUNet_n_proc_DA"] = "0"
    for name, cls in classes.items():
        trainer = make_trainer(cls, device)
        trainer.initialize()
        loader, val = trainer.get_dataloaders()
        batch = next(loader)
        if "params" in batch:
            aug_times = []
            for _ in range(10 if device == "cuda" else 1):
                _sync(device)
                t0 = time.perf_counter()
                augmented = trainer.augment_on_device(batch)
                _sync(device)
                aug_times.append(time.perf_counter() - t0)
            extra[f"{name}_augment_ms_per_batch"] = 1e3 * float(np.median(aug_times[2:] or aug_times))
            batch = augmented
        held = {"data": batch["data"].to(device),
                "target": [t.to(device) for t in batch["target"]] if isinstance(batch["target"], list)
                else batch["target"].to(device)}
        bounds[name] = time_steps(trainer, lambda: held, steps, warmup)
        rows.append({"device": device_name, "trainer": name, "nnUNet_n_proc_DA": "held batch",
                     "it_per_s": bounds[name], "vs_compute_bound": 1.0, "step_ms": 1e3 / bounds[name]})
        print_table(rows[-1:], "compute-only bound")
        shut_down(loader, val)
        del trainer, held, batch
        if device == "cuda":
            torch.cuda.empty_cache()
    if "HeartTrainer_augment_ms_per_batch" in extra:
        extra["augment_share_of_step"] = extra["HeartTrainer_augment_ms_per_batch"] / (1e3 / bounds["HeartTrainer"])
    for n in workers:
        for name, cls in classes.items():
            if time.perf_counter() - started > budget_s:
                extra.setdefault("skipped", []).append(f"{name} with {n} workers: time budget spent")
                continue
            os.environ["nnUNet_n_proc_DA"] = str(n)
            trainer = make_trainer(cls, device)
            trainer.initialize()
            loader, val = trainer.get_dataloaders()
            try:
                rate = time_steps(trainer, lambda: next(loader), steps, warmup)
            finally:
                shut_down(loader, val)
            rows.append({"device": device_name, "trainer": name, "nnUNet_n_proc_DA": n,
                         "it_per_s": rate, "vs_compute_bound": bounds[name] / rate, "step_ms": 1e3 / rate})
            print_table(rows[-1:], "training iterations")
            del trainer
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _plot(rows, ax):
    cpu = [r for r in rows if r.get("cpu_s_per_batch") is not None]
    ax.barh([r["path"][:40] for r in cpu], [r["cpu_s_per_batch"] for r in cpu], color="tab:blue")
    ax.set_xlabel("CPU seconds a batch (mean)")
    ax.invert_yaxis()


def main(args):
    quick = getattr(args, "quick", False)
    root = Path(getattr(args, "augment_data", Path.home() / ".cache" / "nnunet-heart-ext" / "bench_augment"))
    point_nnunet_at(root)
    build_dataset(root, 1 if quick else getattr(args, "augment_cases", 2))
    extra = {"data": str(root), "plans": PLANS_FILE.name}
    rows = cpu_rows(2 if quick else getattr(args, "augment_rounds", 20), extra)
    train_rows = []
    if torch.cuda.is_available():
        workers = [int(w) for w in str(getattr(args, "augment_workers", "4,12,2")).split(",")]
        train_rows = cuda_rows(workers[:1] if quick else workers, 5 if quick else getattr(args, "augment_steps", 15),
                               getattr(args, "augment_budget_s", 240), extra)
    extra["training"] = train_rows
    extra["notes"] = ("cpu_s_per_batch: process time (all threads) of next() on the training loader "
                      "(nnUNet_n_proc_DA=0, one process), mean over the batches (cpu_s_median: median); "
                      "vs_nnunet = nnUNetTrainer's mean / this row's. Training rows: iterations a "
                      "second over the timed steps after 3 warm-up steps, network not compiled; vs_compute_bound = "
                      "the trainer's held-batch rate / this row's rate.")
    print_table(train_rows, "training iterations a second")
    report("augment", rows, title="training data path: CPU seconds a batch", plot=_plot, extra=extra,
           results_dir=getattr(args, "out", None) or RESULTS_DIR)
