"""Experiment planners for Dataset100_Heart (`nnUNetv2_plan_and_preprocess -pl HeartPlanner`).

- `HeartPlanner` -> plans `HeartPlans`: nnU-Net's residual-encoder preset M (about 9-11 GB of
  GPU memory by default; `-gpu_memory_target` scales it, as for nnU-Net's ResEnc planners),
  with its own preprocessed-data folder so that its preprocessing choices never mix with
  `nnUNetPlans` data. Preprocessing by `HeartPreprocessor`, resampling (preprocessing and
  export) by `resample_data_or_seg_to_shape_numba`: nnU-Net's results, faster.
- `HeartDemoPlanner` -> plans `HeartDemoPlans`: a small network and patch for the synthetic
  phantom on a CPU (used by `ensemble_pipeline.sh --demo` and the tests), and CT channels
  normalised by `HeartCTFloorNormalization` (nnunet_heart_ext/nnunet/normalization.py: nnU-Net's
  CT normalisation without clipping the calcifications away, shifted so that the padding is air).
"""
from typing import List, Tuple, Union

from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    ResEncUNetPlanner,
)

from nnunet_heart_ext.nnunet.resampling import resample_data_or_seg_to_shape_numba


class HeartPlanner(ResEncUNetPlanner):
    plans_name = "HeartPlans"

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = None,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        # nnUNetv2_plan_and_preprocess always passes its CLI default 'DefaultPreprocessor';
        # HeartPlans use HeartPreprocessor (same results, faster crop) unless another one is named.
        if preprocessor_name == "DefaultPreprocessor":
            preprocessor_name = "HeartPreprocessor"
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.plans_name, overwrite_target_spacing, suppress_transpose)
        # nnU-Net's ResEnc M preset (nnUNetPlannerResEncM), without its warning for other targets.
        self.UNet_vram_target_GB = gpu_memory_target_in_gb
        self.UNet_reference_val_corresp_GB = 8
        self.UNet_reference_val_3d = 680000000
        self.UNet_reference_val_2d = 135000000
        self.max_dataset_covered = 1

    def determine_resampling(self, *args, **kwargs):
        # nnU-Net's choices (order 3 images, order 1 segmentations), computed by the Numba kernel
        data_fn, data_kwargs, seg_fn, seg_kwargs = super().determine_resampling(*args, **kwargs)
        return resample_data_or_seg_to_shape_numba, data_kwargs, resample_data_or_seg_to_shape_numba, seg_kwargs

    def determine_segmentation_softmax_export_fn(self, *args, **kwargs):
        _, kwargs_export = super().determine_segmentation_softmax_export_fn(*args, **kwargs)
        return resample_data_or_seg_to_shape_numba, kwargs_export

    def generate_data_identifier(self, configuration_name: str) -> str:
        # ResEnc planners reuse nnUNetPlans' folders for 2d/3d_fullres; ours may preprocess
        # differently, so each plans file gets its own folder.
        return self.plans_identifier + "_" + configuration_name


class HeartDemoPlanner(HeartPlanner):
    """Few features and a small patch: trains on 2 CPU cores in minutes (synthetic data only)."""
    plans_name = "HeartDemoPlans"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.UNet_base_num_features = 8
        self.UNet_max_features_3d = 64
        self.UNet_max_features_2d = 64
        self.UNet_blocks_per_stage_encoder = (1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)
        # A tiny memory budget makes nnU-Net's own patch-size search shrink the patch.
        self.UNet_vram_target_GB = 0.05
        self.UNet_min_batch_size = 2

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
        schemes, use_mask = super().determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        # the floor, not the mean, at 0: nnU-Net's zero padding then looks like air, not myocardium
        # (normalization.py); plans made before name HeartCTNormalization, which stays registered
        return ["HeartCTFloorNormalization" if s == "CTNormalization" else s for s in schemes], use_mask
