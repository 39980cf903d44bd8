"""What the pipeline tells the user: each step's state (--status, --status --json), the Dice
tables (validation per fold, the demo's test score) and the closing summary (the page with
pictures is `nnunet-heart report`'s, the report step: nnunet_heart_ext/report/).

Everything here reads files that nnU-Net's own commands wrote (through nnunet_outputs.py, at the
paths of layout.py); scoring uses nnU-Net's own `compute_metrics_on_folder_simple`.
"""
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

from nnunet_heart_ext.data import dataset as ds
from nnunet_heart_ext.data.files import write_text
from nnunet_heart_ext.pipeline import nnunet_outputs
from nnunet_heart_ext.pipeline.layout import Layout


# ----------------------------------------------------------------------------- status
def status(steps, as_json: bool = False, jobs: Optional[Dict[str, List[str]]] = None, out=None) -> List[dict]:
    """Each step's state, from its in-process check; `jobs`: step -> live Slurm jobs (if any)."""
    from nnunet_heart_ext.pipeline.errors import PipelineError

    out = out or sys.stdout
    rows = []
    for step in steps:
        try:
            c = step.check()
            row = dict(step=step.name, done=c.done, reason=c.reason)
        except PipelineError as e:
            row = dict(step=step.name, done=False, reason=str(e))
        if jobs and jobs.get(step.name):
            row["jobs"] = jobs[step.name]
        rows.append(row)
    if as_json:
        json.dump(rows, out, indent=1)
        out.write("\n")
    else:
        for r in rows:
            state = "done" if r["done"] else "to do"
            line = f"{r['step']:<12} {state:<6} {r['reason']}"
            if r.get("jobs"):
                line += f"   [slurm: {', '.join(r['jobs'])}]"
            out.write(line + "\n")
    out.flush()
    return rows


# ----------------------------------------------------------------------------- Dice tables
def _dice_row(summary_file: Path) -> list:
    per_class, mean = nnunet_outputs.dice_per_class(Path(summary_file))
    return [per_class[k] for k in ds.CLASSES] + [mean]


def _table(rows: list) -> str:
    head = ["", *ds.CLASSES.values(), "mean"]
    lines = ["  ".join(f"{h:>14}" for h in head)]
    for name, values in rows:
        lines.append("  ".join([f"{name:>14}"] + [f"{v:>14.4f}" for v in values]))
    return "\n".join(lines)


def validation_summary(layout: Layout, configs: List[str], folds: List[int]) -> str:
    """Validation Dice per class and fold (from each fold's validation/summary.json)."""
    parts = []
    for config in configs:
        rows = []
        for f in folds:
            s = layout.validation_summary(config, f)
            if s.is_file():
                rows.append((f"fold {f}", _dice_row(s)))
        parts.append(f"validation Dice, {layout.model_dir(config).name}:\n"
                     + (_table(rows) if rows else "  (no validation results)"))
    return "\n".join(parts)


def decision_summary(layout: Layout) -> str:
    """What the decision offsets and gate bought on each fold's validation ('' before the best step)."""
    info_file = layout.inference_information
    try:
        info = nnunet_outputs.read_inference_information(info_file)
        path = layout.decision_file(info)
        chosen = nnunet_outputs.read_decision(path)
    except Exception:  # noqa: BLE001  (no choice yet, or a file the next run redoes)
        return ""
    rows = []
    for fold, key, values in chosen.fold_rows():
        finite = [v for v in values if v == v]
        rows.append((f"fold {fold} {'argmax' if key == 'nnunet' else 'decided'}",
                     list(values) + [sum(finite) / len(finite) if finite else float("nan")]))
    pp = chosen.postprocessing
    postprocessing = "" if pp is None else f"\npostprocessing ({layout.postprocessing_file(info).name}): {pp.summary()}"
    return (f"decision ({path.name}): {chosen.describe()}; validation Dice without and with it:\n"
            + _table(rows) + postprocessing)


def dice_table(summary_json: Path) -> str:
    """The Dice per class of one nnU-Net summary.json (the demo's test score)."""
    return f"test Dice against the ground truth ({summary_json}):\n" + _table([("test", _dice_row(summary_json))])


def score(zip_path: Path, ground_truth: Dict[str, Path], out_json: Path, num_processes: int = 1) -> dict:
    """Dice per class of the predictions in `zip_path` (the submission's names) against the ground
    truth files (case -> file), by nnU-Net's compute_metrics_on_folder_simple; written atomically."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    from nnunet_heart_ext.pipeline.errors import PipelineError

    with tempfile.TemporaryDirectory() as tmp:
        pred, ref = Path(tmp) / "pred", Path(tmp) / "ref"
        ref.mkdir()
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(pred)
        for f in sorted(pred.iterdir()):
            case = ds.SUBMISSION.case(f.name)
            if case is None:
                raise PipelineError(f"{zip_path}: {f.name} is not a submission file name ({ds.SUBMISSION.example})")
            if case not in ground_truth:
                raise PipelineError(f"no ground truth for {f.name} of {zip_path}")
            os.rename(f, pred / ds.PREDICTION.name(case))
            os.symlink(Path(ground_truth[case]).absolute(), ref / ds.PREDICTION.name(case))
        tmp_json = Path(tmp) / ds.VALIDATION_SUMMARY
        compute_metrics_on_folder_simple(str(ref), str(pred), list(ds.CLASSES), str(tmp_json),
                                         num_processes=num_processes)
        write_text(tmp_json.read_text(), Path(out_json))
    print(dice_table(Path(out_json)), flush=True)
    return nnunet_outputs.read_summary(Path(out_json))


# ----------------------------------------------------------------------------- closing summary
def summary(ctx, timings: Dict[str, tuple]) -> str:
    """Steps with seconds and state, validation Dice, the demo's test Dice, the submission."""
    lines = ["", "================ summary ================", f"{'step':<12} {'seconds':>10}  state"]
    for name, (seconds, state) in timings.items():
        lines.append(f"{name:<12} {seconds:>10.0f}  {state}")
    layout = ctx.layout
    lines += ["", validation_summary(layout, ctx.o.configs, ctx.o.folds)]
    decision = decision_summary(layout)
    if decision:
        lines += ["", decision]
    if ctx.o.demo and layout.test_dice.is_file():
        lines += ["", dice_table(layout.test_dice)]
    if layout.submission.is_file():
        lines += ["", f"submission: {layout.submission}"]
    if layout.report_html.is_file():
        lines += [f"report: {layout.report_html} (open it in a browser before uploading)"]
    return "\n".join(lines)

