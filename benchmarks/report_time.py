"""Time `nnunet-heart report` on full-size test cases (issue 34 item 5: 50 cases in under a minute on
2 cores, each image read once).

    nnunet-heart phantom --out DIR --full-size --train 8 --test 50 --seed 0     # about 10 minutes, 7 GB
    python -m benchmarks.report_time --phantom DIR [--work DIR] [--runs 2]

The predictions are the phantom's test labels, lightly perturbed in three cases (the valve
dropped, a second myocardium blob in the air at a corner, a calcification far from the valve) so
that the flags are exercised too, zipped as the submission (stored: `predict.zip`). Then
`nnunet-heart report --pred predict.zip --images testing_image --train-labels training_label --out
OUT` runs `--runs` times in a fresh folder each, as a user runs it (a new process: start-up, the
zip extracted, the pool of workers, the page and JSON written); the first reads the training
labels, and one more run in the last run's folder shows a rerun, which takes their measures from
report.json. Wall time per run, the CPU time of the command and its workers (user + system: what
the work costs whatever else the machine runs; on 2 free cores the wall time is about half of it),
the machine's load before each (`os.getloadavg`) and the page's size go to
benchmarks/results/report_time.json; the table is printed.
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks.common import RESULTS_DIR, report


def _perturbed_predictions(phantom: Path, out: Path) -> Path:
    """predict.zip of the phantom's test labels, three of them perturbed; returns its path."""
    from nnunet_heart_ext.data import dataset as ds

    labels = ds.cases_in(phantom / ds.TEST_LABEL_DIRS[0], ds.ORGANIZER_LABEL)
    folder = out / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    changes = {}
    for i, (case, path) in enumerate(sorted(labels.items())):
        target = folder / ds.SUBMISSION.name(case)
        if i >= 3:
            shutil.copy2(path, target)
            continue
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        corner = tuple(slice(2, 8) for _ in range(3))
        if i == 0:
            array[array == ds.LABELS["aortic_valve"]] = 0
            changes[case] = "valve dropped"
        elif i == 1:
            array[corner] = ds.LABELS["myocardium"]
            changes[case] = "second myocardium blob in a corner"
        else:
            array[corner] = ds.LABELS["calcification"]
            changes[case] = "calcification in a corner"
        result = sitk.GetImageFromArray(array)
        result.CopyInformation(image)
        sitk.WriteImage(result, str(target), True)
    zip_path = out / "predict.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f.name)
    print(f"predictions: {len(labels)} cases ({changes}) -> {zip_path}", flush=True)
    return zip_path


def _run(zip_path: Path, phantom: Path, out: Path) -> dict:
    from nnunet_heart_ext.data import dataset as ds

    command = [str(Path(sys.executable).parent / "nnunet-heart"), "report", "--pred", str(zip_path), "--images",
               str(phantom / ds.TEST_IMAGE_DIRS[0]), "--train-labels", str(phantom / ds.TRAIN_LABEL_DIRS[0]),
               "--out", str(out)]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    p = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its (joined) worker processes
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"report failed ({p.returncode}): {p.stderr[-2000:]}")
    print(p.stdout.strip().splitlines()[-1], flush=True)
    return dict(seconds=round(seconds, 2), cpu_seconds=round(cpu, 2), load_before=round(load, 2),
                page_mb=round((out / ds.REPORT_HTML).stat().st_size / 1e6, 2), command=" ".join(command))


def main(argv=None) -> int:
    from nnunet_heart_ext.data import dataset as ds
    from nnunet_heart_ext.kernels.cores import usable_cores

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantom", type=Path, required=True, help="a full-size phantom (nnunet-heart phantom "
                                                                     "--full-size --train 8 --test 50)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: PHANTOM/../report_time)")
    parser.add_argument("--runs", type=int, default=2, help="fresh runs (default 2), then one rerun")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    work = args.work or args.phantom.parent / "report_time"
    zip_path = _perturbed_predictions(args.phantom, work)
    n_test = len(ds.cases_in(args.phantom / ds.TEST_IMAGE_DIRS[0], ds.ORGANIZER_IMAGE))
    n_train = len(ds.cases_in(args.phantom / ds.TRAIN_LABEL_DIRS[0], ds.ORGANIZER_LABEL))
    from nnunet_heart_ext.data.io import read_geometry

    images = ds.cases_in(args.phantom / ds.TEST_IMAGE_DIRS[0], ds.ORGANIZER_IMAGE).values()
    sizes = [read_geometry(p).size for p in images]
    voxels = [int(np.prod(s)) for s in sizes]
    data = dict(usable_cores=usable_cores(), test_image_sizes_min_max=[list(min(sizes, key=np.prod)),
                                                                       list(max(sizes, key=np.prod))],
                test_voxels_total=int(sum(voxels)), test_images_gb_on_disk=round(sum(p.stat().st_size
                                                                                     for p in images) / 1e9, 2))
    rows = []
    for i in range(args.runs):
        out = work / f"report_{i}"
        shutil.rmtree(out, ignore_errors=True)
        rows.append(dict(run=f"fresh {i + 1}", test_cases=n_test, training_labels_read=n_train, **_run(zip_path,
                                                                                                       args.phantom,
                                                                                                       out)))
    rows.append(dict(run="rerun", test_cases=n_test, training_labels_read=0, **_run(zip_path, args.phantom, out)))
    report("report_time", rows, title=f"nnunet-heart report, {n_test} full-size test cases", extra=data,
           results_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
