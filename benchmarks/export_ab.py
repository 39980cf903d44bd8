"""Paired timing of the extension's export of one full-size case in two trees of this project (issue 35:
"the full-size export timings are no slower"), one process per run, alternating trees:

    for i in 1 2 3; do for t in OLD_TREE NEW_TREE; do PYTHONPATH=$t python benchmarks/export_ab.py; done; done

Each process times nnunet_heart_ext.nnunet.prediction_export.export_prediction_from_logits (what
HeartTrainer models run) on bench_predict's full-size logits (4 x 340 x 467 x 467 float16 -> 340 x 512 x
512), label map alone and with the .npz, best of REPS (default 2) after warming the Numba kernels,
and prints one JSON line (the tree, the load average, the seconds)."""
import json, os, sys, tempfile, time, shutil
from copy import deepcopy
from pathlib import Path
import numpy as np
from benchmarks import bench_predict as bp
import nnunet_heart_ext as package
import nnunet_heart_ext._hook  # noqa: F401
from nnunet_heart_ext.nnunet import prediction_export
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

LOGITS = Path("/tmp/export_logits.npy")
if not LOGITS.exists():
    np.save(LOGITS, bp.make_logits((340, 467, 467)))
logits = np.load(LOGITS)
props = bp.properties(logits.shape[1:], (340, 512, 512))
pm = PlansManager(bp.plans_with("resample_data_or_seg_to_shape_numba"))
cm = pm.get_configuration("3d_fullres")
small = logits[:, :12, :20, :20].copy()
for p in (False, True):
    prediction_export.convert_predicted_logits_to_segmentation_with_correct_shape(
        small, pm, cm, pm.get_label_manager(bp.DATASET_JSON), bp.properties(small.shape[1:], (12, 22, 22)), p)
out = {"tree": str(Path(package.__file__).parents[1]), "load": os.getloadavg()[0]}
work = Path(tempfile.mkdtemp(prefix="export_ab_"))
for p in (False, True):
    best = []
    for r in range(int(os.environ.get("REPS", "2"))):
        t = time.perf_counter()
        prediction_export.export_prediction_from_logits(logits, deepcopy(props), cm, pm, bp.DATASET_JSON,
                                                        str(work / "case"), p)
        best.append(time.perf_counter() - t)
    out["probabilities" if p else "labels"] = min(best)
shutil.rmtree(work)
print(json.dumps(out))
