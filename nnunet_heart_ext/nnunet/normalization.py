"""CT normalisation that keeps calcifications visible (named in plans as `HeartCTNormalization`).

nnU-Net's `CTNormalization` clips every image to the 0.5 and 99.5 percentiles of the labelled
voxels' intensities, then z-scores with their mean and std. In cardiac CT nearly all labelled
voxels are myocardium and valve (~50-200 HU, some contrast blood by partial volume), so the upper
bound lands below the calcium: 478 HU on the AICUP 2025 data, 236-269 HU on the phantom, where
calcifications (130 to well over 1000 HU) and contrast blood (300-450 HU) then become the same
value. Contestants' plain nnU-Net scored 0.00 on calcification; the teams near the top fed a
300/1500 HU window (-450 to 1050 HU) as an extra channel.

`HeartCTNormalization` is CTNormalization with the upper bound raised to at least
`CALCIUM_CEILING_HU` (1000 HU): the same lower bound, mean and std, so everything up to the old
upper bound maps exactly as nnU-Net maps it, and brighter voxels keep their order up to 1000 HU.
"""
import numpy as np
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

CALCIUM_CEILING_HU = 1000.0


class HeartCTNormalization(CTNormalization):
    def run(self, image: np.ndarray, seg: np.ndarray = None) -> np.ndarray:
        assert self.intensityproperties is not None, "HeartCTNormalization requires intensity properties"
        eps = 1e-8 if not self.target_dtype == np.float16 else 1e-4
        properties = self.intensityproperties
        upper = max(properties["percentile_99_5"], CALCIUM_CEILING_HU)
        image = image.astype(self.target_dtype, copy=False)
        np.clip(image, properties["percentile_00_5"], upper, out=image)
        image -= properties["mean"]
        image /= max(properties["std"], eps)
        return image
