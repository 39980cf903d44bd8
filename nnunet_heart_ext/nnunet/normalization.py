"""CT normalisations that keep calcifications visible (named in plans as `HeartCTNormalization`,
`HeartCTFloorNormalization`).

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

`HeartCTFloorNormalization` (what HeartDemoPlans name since run L) clips the same way and divides
by the same std, but subtracts the lower bound instead of the mean: x -> (clip(x) - p0.5) / std.
The two differ by the constant (mean - p0.5) / std, which instance normalisation after the first
convolution removes everywhere except where the convolution reads padding. nnU-Net pads with 0:
convolutions, the loader's patches beyond the image, the spatial transform's rotations and the
sliding window on images smaller than the patch. With the mean subtracted, 0 is the labelled
tissues' mean intensity: in a heart CT, myocardium. Every window border and out-of-image region
then looks like a wall of myocardium, and a sliding window over air beside the body (which
foreground-oversampled training rarely shows) can read as a ring of muscle: on phantom seed 28 a
17,038-voxel "myocardium" in the air at the image's border, larger than the heart, so
keep-largest kept it (test myocardium Dice 0.688). With the lower bound subtracted, 0 is air, fat
and everything else below the labelled tissues: padding looks like what lies outside a CT's field
of view.
"""
import numpy as np
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

CALCIUM_CEILING_HU = 1000.0


class HeartCTNormalization(CTNormalization):
    def _zero(self, properties: dict) -> float:
        """The intensity that maps to 0: the labelled voxels' mean, as nnU-Net's."""
        return properties["mean"]

    def run(self, image: np.ndarray, seg: np.ndarray = None) -> np.ndarray:
        assert self.intensityproperties is not None, f"{type(self).__name__} requires intensity properties"
        eps = 1e-8 if not self.target_dtype == np.float16 else 1e-4
        properties = self.intensityproperties
        upper = max(properties["percentile_99_5"], CALCIUM_CEILING_HU)
        image = image.astype(self.target_dtype, copy=False)
        np.clip(image, properties["percentile_00_5"], upper, out=image)
        image -= self._zero(properties)
        image /= max(properties["std"], eps)
        return image


class HeartCTFloorNormalization(HeartCTNormalization):
    """HeartCTNormalization shifted so that the lower clip bound (and so nnU-Net's zero padding) is
    0: x -> (clip(x, p0.5, max(p99.5, 1000 HU)) - p0.5) / std."""

    def _zero(self, properties: dict) -> float:
        return properties["percentile_00_5"]  # clipped voxels become exactly 0
