"""The data steps: prepare (organizer files -> nnU-Net's raw dataset) and plan (plans,
preprocessing, splits_final.json)."""
import json
import shutil
from pathlib import Path
from typing import Iterator, List, Optional

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.pipeline import nnunet_outputs
from nnunet_heart_ext.pipeline.checks import Check, first_problem, json_problem, mtime, newest, pickle_problem, \
    segmentation_problem
from nnunet_heart_ext.pipeline.errors import NotReady, PipelineError
from nnunet_heart_ext.pipeline.steps.base import Action, Job, Step, Wave


class Prepare(Step):
    name = "prepare"
    needs = ()

    def writes(self) -> List[Path]:
        raw = self.layout.raw
        return [raw.root, raw.images_tr, raw.labels_tr, raw.images_ts]

    def _phantom_check(self) -> Optional[str]:
        if not self.o.phantom:
            return None
        from nnunet_heart_ext.data.phantom import phantom_differs

        from nnunet_heart_ext.pipeline.demo import DEMO

        return phantom_differs(self.layout.src, DEMO["n_train"], DEMO["n_test"], self.o.seed)

    def check(self) -> Check:
        from nnunet_heart_ext.data.prepare import pending

        raw = self.layout.raw
        if self.layout.src is None:
            if raw.dataset_json.is_file():
                return Check(True, f"{raw.root} (no --src given: taken as it is)")
            return Check(False, "no --src given and no prepared dataset")
        reason = self._phantom_check()
        if reason:
            return Check(False, reason)
        reason = pending(self.layout.src, self.layout.raw_root, test_dir=self.layout.test_dir)
        return Check(reason is None, reason or f"{raw.root} matches {self.layout.src}")

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        from nnunet_heart_ext.pipeline.demo import DEMO

        src = self.layout.src
        if src is None:
            raise PipelineError("--src DIR is required (the organizer folder with training_image1..3/ and "
                                "training_label/), or --demo")
        if self.o.phantom and (forced or self._phantom_check()):
            yield Wave([Job("phantom", ["nnunet-heart", "phantom", "--out", str(src), "--train",
                                        str(DEMO["n_train"]), "--test", str(DEMO["n_test"]), "--seed",
                                        str(self.o.seed)], self.layout.log("prepare"))])
        elif not src.is_dir() and not assume:
            raise PipelineError(f"--src {src} is not a folder")
        argv = ["nnunet-heart", "prepare", "--src", str(src), "--raw", str(self.layout.raw_root)]
        if self.layout.test_dir is not None:  # otherwise prepare finds the test folder itself
            argv += ["--test-dir", str(self.layout.test_dir)]
        yield Wave([Job("prepare", argv, self.layout.log("prepare"))])


def estimate_preprocessed_bytes(raw: ds.RawDataset, n_configs: int) -> int:
    """Disk that preprocessing will need, from image headers: per configuration, every training
    image as float32 plus its segmentation as int8 (nnU-Net's blosc2 files compress CT poorly,
    so this is an upper-end guess at the original spacing), plus the copied label files."""
    from nnunet_heart_ext.data.io import read_geometry

    voxels = 0
    for case in raw.training_cases():
        n = 1
        for s in read_geometry(raw.image(case)).size:
            n *= s
        voxels += n
    label_bytes = sum(raw.label(c).stat().st_size for c in raw.training_cases())
    return int(voxels * (4 + 1) * n_configs * 1.2) + label_bytes


class Plan(Step):
    name = "plan"
    needs = ("prepare",)

    def writes(self) -> List[Path]:
        return [self.layout.preprocessed, self.layout.gt_segmentations]

    def reads(self) -> List[Path]:
        return [self.layout.raw.root, self.layout.raw.images_tr, self.layout.raw.labels_tr]

    def _plans(self) -> nnunet_outputs.Plans:
        plans = nnunet_outputs.read_plans(self.layout.plans_file)
        missing = [c for c in self.o.configs if c not in plans.configurations]
        if missing:
            raise PipelineError(f"configuration {', '.join(missing)} is not in {self.layout.plans_file} "
                                f"(it has {', '.join(plans.configurations)})")
        return plans

    def _preprocessing_check(self) -> Check:
        raw, layout = self.layout.raw, self.layout
        if not layout.plans_file.is_file():
            return Check(False, f"{layout.plans_file} is missing")
        problem = json_problem(layout.plans_file)  # nnU-Net writes it in place
        if problem:
            return Check(False, f"{layout.plans_file} is {problem}")
        plans = self._plans()
        cases = raw.training_cases()
        for config in self.o.configs:
            folder = layout.preprocessed_data(plans.data_identifier(config))
            problems = {}
            for case in cases:
                pkl = folder / f"{case}.pkl"  # written last of a case's files
                if not pkl.is_file():
                    problems[case] = "not preprocessed"
                elif mtime(pkl) < newest([raw.image(case), raw.label(case)]):
                    problems[case] = "preprocessed before its raw files changed"
                elif pickle_problem(pkl):
                    problems[case] = f"{pkl.name} is {pickle_problem(pkl)}"
            if problems:
                return Check(False, first_problem(problems, len(cases), folder))
        gt = ds.cases_in(layout.gt_segmentations, ds.RAW_LABEL)
        if sorted(gt) != cases:
            return Check(False, f"{layout.gt_segmentations} does not hold the {len(cases)} training cases")
        cut = {case: p for case, path in gt.items() for p in [segmentation_problem(path)] if p}
        if cut:
            return Check(False, first_problem(cut, len(cases), layout.gt_segmentations))
        return Check(True)

    def check(self) -> Check:
        if not self.layout.raw.dataset_json.is_file():
            return Check(False, f"{self.layout.raw.dataset_json} is missing (prepare first)")
        c = self._preprocessing_check()
        if not c.done:
            return c
        if not self.layout.splits_file.is_file():
            return Check(False, f"{self.layout.splits_file} is missing")
        return Check(True, f"{', '.join(self.o.configs)} preprocessed with {self.o.plans}")

    def disk_check(self) -> None:
        gb = 1024 ** 3
        raw, preprocessed = self.layout.raw, self.layout.preprocessed_root
        need = estimate_preprocessed_bytes(raw, len(self.o.configs))
        preprocessed.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(preprocessed).free
        if free < need:
            raise PipelineError(f"preprocessing {raw.root} needs about {need / gb:.1f} GiB in "
                                f"{preprocessed}, only {free / gb:.1f} GiB are free (free space, or set "
                                f"nnUNet_preprocessed elsewhere; --skip-disk-check to try anyway)")
        print(f"  disk: preprocessing needs about {need / gb:.2f} GiB, {free / gb:.1f} GiB free in "
              f"{preprocessed}", flush=True)  # noqa: T201

    def write_splits(self) -> None:
        """nnU-Net's default split, as nnUNetTrainer.do_split makes it (generate_crossval_split of the
        sorted case ids, seed 12345, 5 folds), written before any training: folds started side by
        side (here or as Slurm array tasks on other nodes) then never race to create it."""
        from nnunet_heart_ext.data.files import write_text
        cases = self.layout.raw.training_cases()
        if len(cases) < nnunet_outputs.N_FOLDS:
            return  # nnU-Net's trainer will say what is wrong
        splits = nnunet_outputs.nnunet_split(cases)
        write_text(json.dumps(splits, indent=4), self.layout.splits_file)

    def waves(self, forced: bool, assume: bool = False) -> Iterator[Wave]:
        dataset_json = self.layout.raw.dataset_json
        if not dataset_json.is_file():
            if not assume:
                raise NotReady(f"{dataset_json} missing: run the prepare step first")
        if forced or not dataset_json.is_file() or not self._preprocessing_check().done:
            if not self.o.skip_disk_check:
                yield Wave([Action("disk", "estimate the disk space preprocessing needs", self.disk_check)])
            np_args = ["-np", self.ctx.n_proc, "-npfp", self.ctx.n_proc] if self.ctx.n_proc else []
            yield Wave([Job("plan", ["nnUNetv2_plan_and_preprocess", "-d", str(ds.DATASET_ID), "-pl", self.o.planner,
                                     "-c", *self.o.configs, *np_args, "--verify_dataset_integrity"],
                            self.layout.log("plan"))])
        if not self.layout.splits_file.is_file():  # a split of the user's own is kept, even when forced
            yield Wave([Action("splits", f"write {self.layout.splits_file} (nnU-Net's generate_crossval_split, "
                                         f"seed 12345, 5 folds, as nnUNetv2_train would)", self.write_splits)])
