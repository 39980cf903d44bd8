"""How much of the phantom's test calcium an image shows at all: the bound it puts on a seed's calcium Dice.

    python -m benchmarks.phantom_calcium [--seeds 0-199] [--train 24] [--test 4]

The phantom (nnunet_heart_ext/data/phantom.py) paints each calcification's label before the scanner
blur and noise, so a blob of one or two voxels can end up no brighter than the contrast blood and
tissue beside it: labelled, but not in the image. For each seed's calcified test cases (the demo's
split, redrawn from the seed without writing files) and each calcification (26-connected component
of label 3):

    peak      its brightest voxel (HU)
    around    the brightest voxel that is not calcium within 4 voxels of it, outside its 1-voxel rim
    visible   peak > around: some threshold or model can tell it from everything beside it

A generous bound on what any model can score: every voxel of a visible calcification found and
nothing else predicted, an invisible one missed. A case's calcium Dice is then at most
2v / (1 + v), v the share of its calcium voxels in visible calcifications, and a seed's (nnU-Net's
measure: the mean over its calcified test cases) at most their mean. Reads and writes no image file.
Result: benchmarks/results/phantom_calcium.json and a summary printed.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks.common import atomic_write_bytes, machine
from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.phantom import calcified_test_cases, draw_case

RESULTS = Path(__file__).resolve().parent / "results"
CALCIUM = ds.LABELS["calcification"]
AROUND = 4  # voxels


def calcifications(image: np.ndarray, label: np.ndarray) -> list:
    """Each calcification of one case: its voxels, peak HU, the brightest other voxel around it."""
    calcium = label == CALCIUM
    components, n = ndimage.label(calcium, np.ones((3, 3, 3)))
    rim = ndimage.binary_dilation(calcium, np.ones((3, 3, 3)))
    rows = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        near = tuple(slice(max(0, s.start - AROUND), s.stop + AROUND) for s in box)
        mine = components[near] == index
        others = image[near][~rim[near]]
        peak, around = float(image[near][mine].max()), float(others.max()) if others.size else float("-inf")
        rows.append(dict(voxels=int(mine.sum()), peak_hu=peak, around_hu=around, visible=peak > around))
    assert len(rows) == n
    return rows


def case_bound(rows: list) -> dict:
    """The share of a case's calcium voxels in visible calcifications, and the Dice it bounds."""
    share = sum(r["voxels"] for r in rows if r["visible"]) / sum(r["voxels"] for r in rows)
    return dict(visible_share=share, dice_bound=2 * share / (1 + share))


def seed_bound(seed: int, n_train: int, n_test: int) -> dict:
    cases = []
    for case in calcified_test_cases(n_train, n_test, seed):
        image, label, spacing = draw_case(case, n_train, n_test, seed)
        rows = calcifications(image, label)
        cases.append(dict(case=case, voxel_mm3=float(np.prod(spacing)), calcifications=rows, **case_bound(rows)))
    return dict(seed=seed, cases=cases, dice_bound=float(np.mean([c["dice_bound"] for c in cases])))


def _seeds(text: str) -> list:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-199", help="e.g. 0-199 or 20,21,30 (default 0-199)")
    parser.add_argument("--train", type=int, default=24, help="training cases (the demo's 24)")
    parser.add_argument("--test", type=int, default=4, help="test cases (the demo's 4)")
    parser.add_argument("--out", type=Path, default=RESULTS / "phantom_calcium.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    seeds = [seed_bound(s, args.train, args.test) for s in _seeds(args.seeds)]
    bounds = np.array([s["dice_bound"] for s in seeds])
    blobs = [r for s in seeds for c in s["cases"] for r in c["calcifications"]]
    summary = dict(
        seeds=len(seeds), calcifications=len(blobs),
        invisible=sum(not r["visible"] for r in blobs),
        invisible_voxels=[r["voxels"] for r in blobs if not r["visible"]],
        seeds_bound_under_0_40=[s["seed"] for s in seeds if s["dice_bound"] < 0.40],
        seeds_bound_under_1=sum(bool(b < 1) for b in bounds),
        mean_bound=float(bounds.mean()),
        seconds=round(time.perf_counter() - started, 1))
    out = dict(machine=machine(), split=dict(train=args.train, test=args.test), summary=summary, seeds=seeds)
    atomic_write_bytes(args.out, json.dumps(out, indent=1).encode())
    print(f"{len(seeds)} seeds, {len(blobs)} test calcifications: {summary['invisible']} no brighter than what is "
          f"around them ({summary['invisible_voxels']} voxels)")
    print(f"seeds whose calcium Dice can reach at most < 0.40: {summary['seeds_bound_under_0_40']}; "
          f"< 1: {summary['seeds_bound_under_1']}; mean bound {summary['mean_bound']:.3f}")
    print(f"-> {args.out}")
    return out


if __name__ == "__main__":
    main()
