"""What the steps share: the options, their `Layout` (every path), the slots jobs run on (GPU ids
or CPU slots, resolved before the context is built) and the environment of nnU-Net's commands."""
import os
from typing import Dict, List, Optional, Sequence

from nnunet_heart_ext.pipeline.layout import Layout
from nnunet_heart_ext.pipeline.options import Options


class Context:
    """Settings, paths and slots shared by the steps."""

    def __init__(self, options: Options, slots: Sequence[str]):
        self.o = options
        self.layout = Layout(options)
        self.slots: List[str] = list(slots)  # where slot jobs run side by side (prediction parts: one each)

    # process counts: passed only where the user (or the CPU default) set them; otherwise nnU-Net
    # keeps its own per-command defaults (e.g. 4 for 3d_fullres preprocessing: RAM)
    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.layout.raw_root), nnUNet_preprocessed=str(self.layout.preprocessed_root),
                   nnUNet_results=str(self.layout.results_root), PYTHONUNBUFFERED="1")
        if not self.o.device.gpu:
            env.setdefault("nnUNet_n_proc_DA", "1")
            env.setdefault("nnUNet_def_n_proc", "2")
        return env

    @property
    def n_proc(self) -> Optional[str]:
        return self.env().get("nnUNet_def_n_proc")

    @property
    def n_proc_or_default(self) -> str:
        return self.n_proc or "8"
