"""Where a report's data comes from, stated on the page so that it can be kept beside a
submission: the folders read, the extension's commit (or version), the models' trainer, plans
and configuration, the folds, the postprocessing, when and where it was made, and how."""
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from nnunet_heart_ext.data import dataset as ds

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # nnunet_heart_ext/


def extension_version() -> str:
    """`git describe` of the extension's checkout (commit, and `-dirty` with uncommitted changes),
    or, installed from a wheel, its version."""
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if out.returncode == 0 and commit.returncode == 0:
            return f"git {out.stdout.strip()} (commit {commit.stdout.strip()}) in {PACKAGE_DIR.parent}"
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    try:
        return f"nnunet-heart-ext {metadata.version('nnunet-heart-ext')} (installed, not a git checkout)"
    except metadata.PackageNotFoundError:
        return f"nnunet-heart-ext from {PACKAGE_DIR} (no git, no installed version)"


@dataclass(frozen=True)
class Model:
    folder: str
    trainer: str
    plans: str
    configuration: str
    folds: Tuple[int, ...]


@dataclass(frozen=True)
class Provenance:
    created: str                      # UTC, ISO 8601
    host: str
    command: str
    extension: str
    predictions: str
    images: str
    train_labels: Optional[str]
    train_images: Optional[str]
    models: Tuple[Model, ...]
    postprocessing: Optional[str]
    postprocessing_chosen: Optional[str]  # nnU-Net's postprocessing.json beside it, as it is
    test_summary: Optional[str]

    def to_json(self) -> dict:
        return asdict(self)

    def rows(self) -> List[Tuple[str, str]]:
        """(what, value) for the page."""
        rows = [("created", f"{self.created} on {self.host}"), ("command", self.command),
                ("extension", self.extension), ("test predictions", self.predictions),
                ("test images", self.images), ("training labels", self.train_labels or "(not given)")]
        if self.train_images:
            rows.append(("training images", self.train_images))
        for m in self.models:
            rows.append(("model", f"{m.folder}: trainer {m.trainer}, plans {m.plans}, configuration "
                                  f"{m.configuration}, folds {', '.join(map(str, m.folds)) or '(none)'}"))
        if not self.models:
            rows.append(("model", "(no model folder given: no cross-validation section)"))
        rows.append(("postprocessing", self.postprocessing or "(not given)"))
        if self.postprocessing_chosen:
            rows.append(("postprocessing chosen", self.postprocessing_chosen))
        if self.test_summary:
            rows.append(("test score", self.test_summary))
        return rows


def _chosen_postprocessing(pkl: Optional[Path]) -> Optional[str]:
    """nnU-Net's postprocessing.json beside the .pkl (what it chose, in words), compacted; for
    heart_postprocessing.pkl, what heart_decision.json beside it says was chosen."""
    if pkl is None:
        return None
    if Path(pkl).name == ds.HEART_POSTPROCESSING:
        from nnunet_heart_ext.data import decision_file

        try:
            pp = decision_file.read(Path(pkl).with_name(ds.DECISION)).postprocessing
        except ValueError:
            return None
        return None if pp is None else pp.summary()
    beside = Path(pkl).with_name(ds.POSTPROCESSING_JSON)
    try:
        return json.dumps(json.loads(beside.read_text()), separators=(", ", ": "))
    except (OSError, ValueError):
        return None


def provenance(predictions: Path, images: Path, train_labels: Optional[Path], train_images: Optional[Path],
               models: Sequence[Tuple[Path, Sequence[int]]], postprocessing: Optional[Path],
               test_summary: Optional[Path], argv: Optional[Sequence[str]] = None) -> Provenance:
    described = []
    for folder, folds in models:
        parts = ds.model_of_folder(Path(folder).name) or dict(trainer="?", plans="?", configuration="?")
        described.append(Model(str(folder), parts["trainer"], parts["plans"], parts["configuration"], tuple(folds)))
    argv = list(sys.argv if argv is None else argv)
    command = shlex.join(["nnunet-heart", *argv[1:]] if argv and Path(argv[0]).name == "nnunet-heart" else argv)
    return Provenance(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=platform.node() or os.uname().nodename,
        command=command, extension=extension_version(), predictions=str(predictions), images=str(images),
        train_labels=str(train_labels) if train_labels else None,
        train_images=str(train_images) if train_images else None, models=tuple(described),
        postprocessing=str(postprocessing) if postprocessing else None,
        postprocessing_chosen=_chosen_postprocessing(postprocessing),
        test_summary=str(test_summary) if test_summary else None)
