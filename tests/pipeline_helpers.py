"""Shared by the pipeline tests (local and Slurm): a tiny phantom, throwaway trainers found through
nnU-Net's official `nnUNet_extTrainer` folder, and the environment a user's shell would give."""
import os
import sys
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "ensemble_pipeline.sh"

TRAINER_SOURCE = '''
from nnunet_heart_ext.trainers import HeartTrainer


class PipelineTestTrainer(HeartTrainer):
    """3 epochs x 2 iterations, a checkpoint every epoch: the commands, not the learning."""
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1
        self.test_time_mirroring = False


class PipelineSlowFold1Trainer(PipelineTestTrainer):
    """Fold 1 takes long enough (12 epochs) to be stopped mid-training."""
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if fold == 1:
            self.num_epochs = 12


class PipelineFailingTrainer(PipelineTestTrainer):
    """Fold 1 fails at once; fold 0 trains on (long, unless PIPELINE_TEST_QUICK_FOLD0 is set)."""
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        import os
        if fold == 1:
            raise RuntimeError("deliberate failure in fold 1")
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not os.environ.get("PIPELINE_TEST_QUICK_FOLD0"):
            self.num_epochs = 1000  # fold 0 must still be running when fold 1 fails
'''


def shrink(folder: Path, factor: float = 3.0) -> None:
    """Resample every case to 1/factor of its size (same physical extent): patches then cover
    whole images, so validation and prediction take one window per case."""
    for path in folder.glob("*/*.nii.gz"):
        img = sitk.ReadImage(str(path))
        size = [max(8, int(round(s / factor))) for s in img.GetSize()]
        spacing = [sp * s / n for sp, s, n in zip(img.GetSpacing(), img.GetSize(), size)]
        interp = sitk.sitkNearestNeighbor if path.name.endswith("_gt.nii.gz") else sitk.sitkLinear
        out = sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), spacing,
                            img.GetDirection(), 0, img.GetPixelID())
        sitk.WriteImage(out, str(path))


def tiny_phantom(root: Path, n_train: int = 5, n_test: int = 2, seed: int = 0) -> Path:
    from nnunet_heart_ext.data.phantom import make_phantom

    src = make_phantom(root / "phantom", n_train=n_train, n_test=n_test, seed=seed)
    shrink(src)
    return src


def user_env(root: Path) -> dict:
    """The shell of a user who activated this environment: the test trainers in nnUNet_extTrainer,
    none of nnU-Net's folders set, one process per pool, no Triton interpreter (conftest sets it for the
    kernel tests; it would run the training loss in Triton's interpreter)."""
    trainers = root / "ext_trainers"
    trainers.mkdir(exist_ok=True)
    (trainers / "pipeline_test_trainers.py").write_text(TRAINER_SOURCE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA",
                        "nnUNet_def_n_proc", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["nnUNet_extTrainer"] = str(trainers)
    # one worker per nnU-Net pool: on tiny cases, starting a second worker (importing torch) costs
    # more than it saves (the pipeline's own CPU default, 2, is checked by the dry-run test)
    env["nnUNet_def_n_proc"] = "1"
    return env


def cpu_args(src: Path, trainer: str = "PipelineTestTrainer") -> list:
    return ["bash", str(SCRIPT), "--src", str(src), "--device", "cpu", "--planner", "HeartDemoPlanner",
            "--plans", "HeartDemoPlans", "--trainer", trainer]
