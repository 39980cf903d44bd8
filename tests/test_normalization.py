"""HeartCTNormalization and HeartCTFloorNormalization against nnU-Net's own CTNormalization."""
import numpy as np
import pytest
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

from nnunet_heart_ext.nnunet.normalization import (CALCIUM_CEILING_HU, HeartCTFloorNormalization,
                                                   HeartCTNormalization)


def _properties(rng):
    low = float(rng.uniform(-100, 60))
    high = float(rng.uniform(200, 500))
    return {"mean": float(rng.uniform(low + 20, high - 20)), "std": float(rng.uniform(20, 80)),
            "percentile_00_5": low, "percentile_99_5": high}


def _image(rng, shape=(7, 19, 23)):
    # air, fat, tissue, contrast, calcium and metal, in random order
    return rng.choice([-1024.0, -90.0, 40.0, 130.0, 350.0, 800.0, 1800.0], size=shape) + rng.normal(0, 30, shape)


@pytest.mark.parametrize("seed", range(5))
def test_heart_ct_normalization_is_nnunets_below_its_upper_bound(seed):
    rng = np.random.default_rng(seed)
    props, image = _properties(rng), _image(rng)
    ours = HeartCTNormalization(intensityproperties=props).run(image.copy())
    nnunet = CTNormalization(intensityproperties=props).run(image.copy())
    below = image <= props["percentile_99_5"]
    np.testing.assert_allclose(ours[below], nnunet[below], rtol=0, atol=1e-5)
    # brighter voxels keep their order up to the calcium ceiling, where they are clipped
    above = image > props["percentile_99_5"]
    expected = (np.minimum(image[above], CALCIUM_CEILING_HU) - props["mean"]) / props["std"]
    np.testing.assert_allclose(ours[above], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_floor_normalization_is_heart_ct_normalization_shifted_so_the_floor_is_zero(seed):
    rng = np.random.default_rng(seed)
    props, image = _properties(rng), _image(rng)
    mean_centred = HeartCTNormalization(intensityproperties=props).run(image.copy())
    floored = HeartCTFloorNormalization(intensityproperties=props).run(image.copy())
    shift = (props["mean"] - props["percentile_00_5"]) / props["std"]
    np.testing.assert_allclose(floored, mean_centred + shift, rtol=0, atol=1e-4)
    # air and everything else below the lower bound is exactly nnU-Net's padding value
    below = image <= props["percentile_00_5"]
    assert below.any() and (floored[below] == 0).all()
    assert (floored[~below] > 0).all()
    assert floored.dtype == np.float32


@pytest.mark.parametrize("dtype, std", [(np.float16, 40.0), (np.float32, 0.0)])
def test_floor_normalization_dtype_and_degenerate_std(dtype, std):
    # std 0 (a single labelled intensity) divides by nnU-Net's eps, as CTNormalization does
    props = {"mean": 100.0, "std": std, "percentile_00_5": 100.0, "percentile_99_5": 100.0}
    image = np.array([-1000.0, 100.0, 100.5, 5000.0])
    out = HeartCTFloorNormalization(intensityproperties=props, target_dtype=dtype).run(image.copy())
    assert out.dtype == dtype and np.isfinite(out).all()
    assert out[0] == 0 and out[1] == 0 and 0 < out[2] < out[3]
