"""The fused softmax + Dice + CE loss against nnU-Net's own DC_and_CE_loss with
MemoryEfficientSoftDiceLoss, run on float64 logits: value and gradient, on fresh random inputs
and edge cases, for the torch path and the Triton path (Triton's interpreter on CPU tensors when
TRITON_INTERPRET=1, compiled kernels on CUDA tensors when a GPU is there).

Errors: fp32 value |v - ref| / |ref| <= 1e-5, gradient max|g - ref| / max|ref| <= 1e-4.
fp16/bf16: value <= 2e-3; gradient ||g - r|| / ||ref|| <= 2e-3 where r is the reference rounded to
the logits' dtype, i.e. the best a gradient in that dtype can be (bf16's own rounding is up to
2^-8 relative, above 2e-3, so the exact gradient is no reference for it). Backward
passes use grad_output = 2^16 * 0.533, what GradScaler and the first deep-supervision weight give
in nnU-Net's AMP training.

This module imports only nnunetv2.training.loss (no trainer, no SimpleITK) so that it runs on
the GPU machine; the trainer test imports nnUNetTrainer inside and skips without it.
"""
import os

import numpy as np
import pytest
import torch
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_heart_ext.kernels.fused_dice_ce import FusedDiceCELoss, fused_dice_ce

# (device, backend) pairs this machine can run
PATHS = [("cpu", "torch")]
if os.environ.get("TRITON_INTERPRET") == "1":
    PATHS.append(("cpu", "triton"))
if torch.cuda.is_available():
    PATHS += [("cuda", "triton"), ("cuda", "torch")]
PATH_IDS = [f"{d}-{b}" for d, b in PATHS]

AMP_GRAD_OUTPUT = 2.0 ** 16 * 0.5333


def nnunet_loss(logits, target, *, batch_dice, do_bg, ignore_label=None, weight_ce=1.0, weight_dice=1.0,
                ce_weight=None):
    ce_kwargs = {} if ce_weight is None else {"weight": torch.tensor(ce_weight, dtype=torch.float64)}
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": do_bg, "ddp": False}, ce_kwargs,
                          weight_ce=weight_ce, weight_dice=weight_dice, ignore_label=ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


def reference(logits, target, **kwargs):
    """nnU-Net's loss value and gradient on float64 logits, on the CPU."""
    x = logits.detach().cpu().double().requires_grad_()
    value = nnunet_loss(x, target, **kwargs)(x, target.cpu().double())
    value.backward()
    return value.detach(), x.grad


def fused(logits, target, device, backend, grad_output=1.0, **kwargs):
    """Our loss value and gradient (per unit of grad_output), back on the CPU in float64."""
    x = logits.detach().to(device).requires_grad_()
    value = fused_dice_ce(x, target.to(device), backend=backend, **kwargs)
    (value * grad_output).backward()
    return value.detach().cpu().double(), x.grad.cpu().double() / grad_output, x.grad.dtype


def random_case(shape, seed, ignore_label=None, scale=3.0):
    """Logits of `shape` and float labels (B, 1, *spatial) with every class, plus the ignore
    label on about 1 voxel in 5 when given."""
    g = torch.Generator().manual_seed(seed)
    B, C, *spatial = shape
    logits = torch.randn(shape, generator=g) * scale
    target = torch.randint(0, C, (B, 1, *spatial), generator=g).float()
    if ignore_label is not None:
        target[torch.rand(target.shape, generator=g) < 0.2] = ignore_label
    return logits, target


def assert_close_fp32(value, grad, ref_value, ref_grad):
    assert abs(value - ref_value) / abs(ref_value) <= 1e-5, (value, ref_value)
    err = (grad - ref_grad).abs().max() / ref_grad.abs().max()
    assert err <= 1e-4, f"gradient relative error {err:.3g}"


# 2D and 3D, C = 2..8, spatial sizes that are multiples of no block size, tiles that span blocks
SHAPES = [(2, 2, 37, 29), (2, 4, 41, 27), (3, 8, 29, 31), (2, 3, 9, 11, 13), (1, 5, 7, 10, 11),
          (2, 6, 5, 13, 9), (2, 7, 3, 17, 19)]


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch_dice", [False, True], ids=["sample_dice", "batch_dice"])
@pytest.mark.parametrize("do_bg", [False, True], ids=["no_bg", "bg"])
def test_matches_nnunet_fp32(device, backend, shape, batch_dice, do_bg):
    logits, target = random_case(shape, seed=hash((shape, batch_dice, do_bg)) % 2**31)
    value, grad, grad_dtype = fused(logits, target, device, backend, grad_output=0.75, batch_dice=batch_dice,
                                    do_bg=do_bg)
    assert grad_dtype == torch.float32
    assert_close_fp32(value, grad, *reference(logits, target, batch_dice=batch_dice, do_bg=do_bg))


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(2, 4, 23, 45), (2, 3, 9, 11, 13), (2, 8, 5, 7, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch_dice", [False, True], ids=["sample_dice", "batch_dice"])
def test_ignore_label(device, backend, shape, batch_dice):
    ignore = shape[1]  # nnU-Net requires the ignore label to be the highest one
    logits, target = random_case(shape, seed=7, ignore_label=ignore)
    value, grad, _ = fused(logits, target, device, backend, batch_dice=batch_dice, ignore_label=ignore)
    ref_value, ref_grad = reference(logits, target, batch_dice=batch_dice, do_bg=False, ignore_label=ignore)
    assert_close_fp32(value, grad, ref_value, ref_grad)
    assert (grad.movedim(1, -1)[(target[:, 0] == ignore)] == 0).all()


def edge_target(kind, shape, seed):
    logits, target = random_case(shape, seed)
    C = shape[1]
    if kind == "absent_class":  # class 2 nowhere in the batch
        target[target == 2] = 1
    elif kind == "absent_in_one_sample":  # class 1 missing from sample 0 only
        target[0][target[0] == 1] = 0
    elif kind == "all_background":
        target.zero_()
    elif kind == "single_voxel_class":
        target[target == C - 1] = 0
        target[0, 0, 1, 2] = C - 1
    elif kind == "confident_wrong":  # saturated softmax: logits far apart, the wrong class wins
        logits = torch.where(torch.arange(C).view(1, C, 1, 1) == (target.long() + 1) % C, 40.0, -40.0)
    return logits, target


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("kind", ["absent_class", "absent_in_one_sample", "all_background",
                                  "single_voxel_class", "confident_wrong"])
@pytest.mark.parametrize("batch_dice", [False, True], ids=["sample_dice", "batch_dice"])
@pytest.mark.parametrize("do_bg", [False, True], ids=["no_bg", "bg"])
def test_edge_targets(device, backend, kind, batch_dice, do_bg):
    logits, target = edge_target(kind, (2, 4, 19, 33), seed=11)
    value, grad, _ = fused(logits, target, device, backend, batch_dice=batch_dice, do_bg=do_bg)
    assert torch.isfinite(grad).all()
    assert_close_fp32(value, grad, *reference(logits, target, batch_dice=batch_dice, do_bg=do_bg))


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_all_voxels_ignored(device, backend):
    """nnU-Net skips CE when nothing is labelled; Dice is then (s / s) = 1 for every class."""
    logits, target = random_case((2, 3, 8, 9), seed=3)
    target.fill_(3)
    value, grad, _ = fused(logits, target, device, backend, batch_dice=True, ignore_label=3)
    ref_value, _ = reference(logits, target, batch_dice=True, do_bg=False, ignore_label=3)
    assert value == pytest.approx(ref_value.item(), rel=1e-6) and ref_value.item() == pytest.approx(-1.0)
    assert (grad == 0).all()


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.3, 2.0)], ids=["ce_only", "dice_only", "weighted"])
def test_loss_weights(device, backend, weights):
    logits, target = random_case((2, 4, 11, 13, 5), seed=5)
    kw = dict(batch_dice=False, do_bg=False, weight_ce=weights[0], weight_dice=weights[1])
    value, grad, _ = fused(logits, target, device, backend, **kw)
    assert_close_fp32(value, grad, *reference(logits, target, **kw))


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 4, 37, 29), (2, 3, 9, 11, 13), (2, 4, 16, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch_dice", [False, True], ids=["sample_dice", "batch_dice"])
def test_half_precision(device, backend, dtype, shape, batch_dice):
    """Half logits (as AMP gives them), fp32 sums, gradient written in the logits' dtype. The
    largest shape has CE gradients (1 / 32768 voxels) below fp16's normal range unless scaled.
    The gradient times grad_output is rounded once, so it matches the best gradient in that
    dtype also when grad_output holds a deep-supervision weight that is not a power of two."""
    logits, target = random_case(shape, seed=13)
    logits = logits.to(dtype)
    ref_value, ref_grad = reference(logits, target, batch_dice=batch_dice, do_bg=False)
    for grad_output in [2.0 ** 16, AMP_GRAD_OUTPUT]:
        value, grad, grad_dtype = fused(logits, target, device, backend, grad_output=grad_output,
                                        batch_dice=batch_dice, do_bg=False)
        assert grad_dtype == dtype
        assert abs(value - ref_value) / abs(ref_value) <= 2e-3
        best = (ref_grad * grad_output).to(dtype).double() / grad_output
        err = (grad - best).norm() / ref_grad.norm()
        assert err <= 2e-3, f"gradient relative error {err:.3g} at grad_output {grad_output}"


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("batch_dice", [False, True], ids=["sample_dice", "batch_dice"])
def test_fp16_gradient_range(device, backend, batch_dice):
    """fp16 gradients span the tiny CE terms of a large volume (1 / 131072 voxels, below fp16's
    normal range) and the large Dice terms of a 64-voxel class at once: the stored gradient's
    power-of-two scale must keep both finite and accurate (without it this test fails)."""
    logits, target = edge_target("single_voxel_class", (1, 4, 32, 64, 64), seed=47)
    logits = logits.half()
    value, grad, _ = fused(logits, target, device, backend, grad_output=AMP_GRAD_OUTPUT, batch_dice=batch_dice)
    ref_value, ref_grad = reference(logits, target, batch_dice=batch_dice, do_bg=False)
    assert torch.isfinite(grad).all()
    assert abs(value - ref_value) / abs(ref_value) <= 2e-3
    best = (ref_grad * AMP_GRAD_OUTPUT).half().double() / AMP_GRAD_OUTPUT
    assert (grad - best).norm() / ref_grad.norm() <= 2e-3


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16, torch.int64, torch.int32,
                                          torch.int16, torch.uint8])
def test_target_dtypes(device, backend, target_dtype):
    """nnU-Net passes float labels; integer labels give the same loss and gradient."""
    logits, target = random_case((2, 4, 7, 9, 11), seed=17, ignore_label=4)
    kw = dict(batch_dice=True, do_bg=False, ignore_label=4)
    value, grad, _ = fused(logits, target.to(target_dtype), device, backend, **kw)
    assert_close_fp32(value, grad, *reference(logits, target, **kw))


# The pooling nnU-Net's planner gives a 3d_fullres CT heart plan with a 128^3 patch (spacing
# 0.5 x 0.41 x 0.41 mm): six stages, so deep supervision has five outputs. The patch here is
# that plan's smallest valid one (the product of the pooling), so every scale keeps an integer shape.
PLAN_POOLING = [list(p) for p in get_pool_and_conv_props([0.5, 0.41, 0.41], [128, 128, 128], 4, 999999)[1]]


def deep_supervision_case(patch, num_classes, batch, seed):
    scales = 1 / np.cumprod(np.vstack(PLAN_POOLING), axis=0)[:-1]  # as nnUNetTrainer computes them
    weights = np.array([1 / 2 ** i for i in range(len(scales))])
    weights[-1] = 0
    weights = weights / weights.sum()
    g = torch.Generator().manual_seed(seed)
    logits, targets = [], []
    for s in scales:
        shape = [round(p * f) for p, f in zip(patch, s)]
        logits.append(torch.randn((batch, num_classes, *shape), generator=g) * 2)
        targets.append(torch.randint(0, num_classes, (batch, 1, *shape), generator=g).float())
    return logits, targets, weights


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("batch_dice", [False, True], ids=["sample_dice", "batch_dice"])
def test_deep_supervision_scales_of_a_real_plan(device, backend, batch_dice):
    patch = np.prod(PLAN_POOLING, axis=0).tolist()  # [32, 32, 32]
    logits, targets, weights = deep_supervision_case(patch, num_classes=4, batch=2, seed=19)
    assert [x.shape[2] for x in logits] == [32, 16, 8, 4, 2]
    soft_dice = {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}
    ours = DeepSupervisionWrapper(FusedDiceCELoss(dict(soft_dice), {}), weights)
    theirs = DeepSupervisionWrapper(DC_and_CE_loss(dict(soft_dice), {}, dice_class=MemoryEfficientSoftDiceLoss),
                                    weights)
    xs = [x.to(device).requires_grad_() for x in logits]
    refs = [x.detach().double().requires_grad_() for x in logits]
    value = ours(xs, [t.to(device) for t in targets])
    value.backward()
    ref_value = theirs(refs, [t.double() for t in targets])
    ref_value.backward()
    assert abs(value.item() - ref_value.item()) / abs(ref_value.item()) <= 1e-5
    for x, r, w in zip(xs, refs, weights):
        if w == 0:  # nnU-Net never calls the loss for the lowest output
            assert x.grad is None and r.grad is None
            continue
        err = (x.grad.cpu().double() - r.grad).abs().max() / r.grad.abs().max()
        assert err <= 1e-4, f"gradient relative error {err:.3g} at {tuple(x.shape)}"


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_no_grad_gives_the_value_only(device, backend):
    logits, target = random_case((2, 4, 13, 17), seed=23)
    ref_value, _ = reference(logits, target, batch_dice=True, do_bg=False)
    with torch.no_grad():
        value = fused_dice_ce(logits.to(device), target.to(device), batch_dice=True, backend=backend)
    assert value.requires_grad is False
    assert abs(value.item() - ref_value.item()) / abs(ref_value.item()) <= 1e-5


def test_torch_and_triton_paths_agree_on_a_larger_volume():
    """The two backends of this machine against each other at a size where the interpreter
    runs many tiles (2 x 4 x 24 x 40 x 36 logits, 34 tiles a sample)."""
    if len(PATHS) < 2:
        pytest.skip("only one backend here")
    logits, target = random_case((2, 4, 24, 40, 36), seed=29, ignore_label=4)
    results = [fused(logits, target, d, b, batch_dice=True, ignore_label=4) for d, b in PATHS[:2]]
    (v0, g0, _), (v1, g1, _) = results
    assert abs(v0 - v1) / abs(v0) <= 1e-6
    assert (g0 - g1).abs().max() / g0.abs().max() <= 1e-5


def test_module_mirrors_dc_and_ce_loss_arguments():
    """FusedDiceCELoss takes DC_and_CE_loss's arguments and nnU-Net's defaults; from_nnunet reads
    a (possibly compiled) DC_and_CE_loss; settings it cannot fuse are refused."""
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=0.5,
                          weight_dice=2, ignore_label=4, dice_class=MemoryEfficientSoftDiceLoss)
    loss.dc = torch.compile(loss.dc)  # what nnUNetTrainer does on CUDA; compiles lazily
    fused_loss = FusedDiceCELoss.from_nnunet(loss)
    assert (fused_loss.batch_dice, fused_loss.do_bg, fused_loss.smooth, fused_loss.ddp) == (True, False, 1e-5, False)
    assert (fused_loss.weight_ce, fused_loss.weight_dice, fused_loss.ignore_label) == (0.5, 2, 4)
    defaults = FusedDiceCELoss({}, {})
    assert (defaults.batch_dice, defaults.do_bg, defaults.smooth, defaults.ddp) == (False, True, 1.0, True)
    logits, target = random_case((2, 4, 9, 10), seed=31)
    x = logits.clone().requires_grad_()
    value = FusedDiceCELoss({"batch_dice": False}, {}, ignore_label=None)(x, target)
    ref = DC_and_CE_loss({"batch_dice": False}, {}, dice_class=MemoryEfficientSoftDiceLoss)(logits.double(),
                                                                                           target.double())
    assert abs(value.item() - ref.item()) / abs(ref.item()) <= 1e-5  # smooth 1.0, do_bg True, like nnU-Net's
    with pytest.raises(ValueError, match="ce_kwargs"):
        FusedDiceCELoss({}, {"label_smoothing": 0.1})
    weighted = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
                              {"weight": torch.tensor([1.0, 2.0, 3.0, 30.0])}, dice_class=MemoryEfficientSoftDiceLoss)
    assert FusedDiceCELoss.from_nnunet(weighted).ce_weight == (1.0, 2.0, 3.0, 30.0)
    with pytest.raises(ValueError, match="soft_dice_kwargs"):
        FusedDiceCELoss({"clip_tp": 0.1}, {})


def test_bad_input_is_refused_with_a_clear_error():
    logits, target = random_case((2, 4, 9, 10), seed=37)
    with pytest.raises(ValueError, match="target must be"):
        fused_dice_ce(logits, target[:, :, :5], batch_dice=True)
    with pytest.raises(ValueError, match="logits must be"):
        fused_dice_ce(logits[0], target[0], batch_dice=True)
    with pytest.raises(ValueError, match="no Dice term"):
        fused_dice_ce(logits[:, :1], target, batch_dice=True)
    with pytest.raises(ValueError, match="backend"):
        fused_dice_ce(logits, target, batch_dice=True, backend="cuda")


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_backward_twice_accumulates(device, backend):
    """backward(retain_graph=True) twice gives twice the gradient, as autograd does."""
    logits, target = random_case((2, 4, 9, 10), seed=41)
    _, ref_grad = reference(logits, target, batch_dice=True, do_bg=False)
    x = logits.to(device).requires_grad_()
    value = fused_dice_ce(x, target.to(device), batch_dice=True, backend=backend)
    value.backward(retain_graph=True)
    value.backward()
    assert_close_fp32(value.detach().cpu().double(), x.grad.cpu().double() / 2, value.detach().cpu().double(),
                      ref_grad)


def test_heart_trainer_builds_the_fused_loss_with_nnunet_weights(monkeypatch, tmp_path):
    """HeartTrainer's loss is nnU-Net's DeepSupervisionWrapper, with nnU-Net's weights, around
    FusedDiceCELoss; HeartTrainer_nnUNetLoss keeps DC_and_CE_loss; both give the same value and
    gradients on the five outputs of a real plan."""
    pytest.importorskip("SimpleITK")  # nnUNetTrainer needs it; the GPU machine has no SimpleITK
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    from nnunet_heart_ext.trainers import HeartTrainer, HeartTrainer_nnUNetLoss

    patch = np.prod(PLAN_POOLING, axis=0).tolist()
    losses = {}
    for cls in (HeartTrainer, HeartTrainer_nnUNetLoss):
        trainer = cls(_plans(patch), "3d_fullres", 0, _DATASET_JSON, device=torch.device("cpu"))
        losses[cls.__name__] = trainer._build_loss()
    ours, theirs = losses["HeartTrainer"], losses["HeartTrainer_nnUNetLoss"]
    assert isinstance(ours, DeepSupervisionWrapper) and isinstance(ours.loss, FusedDiceCELoss)
    assert isinstance(theirs, DeepSupervisionWrapper) and isinstance(theirs.loss, DC_and_CE_loss)
    assert ours.weight_factors == theirs.weight_factors
    _, _, weights = deep_supervision_case(patch, 4, 2, seed=0)
    np.testing.assert_allclose(ours.weight_factors, weights, rtol=0, atol=0)
    assert ours.loss.batch_dice is True and ours.loss.do_bg is False and ours.loss.smooth == 1e-5

    logits, targets, _ = deep_supervision_case(patch, 4, 2, seed=43)
    xs = [x.clone().requires_grad_() for x in logits]
    refs = [x.double().requires_grad_() for x in logits]
    value, ref_value = ours(xs, targets), theirs(refs, [t.double() for t in targets])
    value.backward()
    ref_value.backward()
    assert abs(value.item() - ref_value.item()) / abs(ref_value.item()) <= 1e-5
    for x, r in zip(xs[:-1], refs[:-1]):
        assert (x.grad.double() - r.grad).abs().max() / r.grad.abs().max() <= 1e-4


_DATASET_JSON = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1,
                 "labels": {"background": 0, "myocardium": 1, "aortic_valve": 2, "calcification": 3}}


def _plans(patch):
    """A minimal 3d_fullres plan with PLAN_POOLING (only what nnUNetTrainer.__init__ and
    _build_loss read)."""
    n = len(PLAN_POOLING)
    arch = {"n_stages": n, "features_per_stage": [4] * n, "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": PLAN_POOLING, "n_conv_per_stage": [1] * n,
            "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    config = {"data_identifier": "test", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
              "patch_size": patch, "median_image_size_in_voxels": patch, "spacing": [1.0, 1.0, 1.0],
              "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
              "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities_kwargs": {}, "batch_dice": True,
              "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                               "arch_kwargs": arch,
                               "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    return {"dataset_name": "Dataset100_Heart", "plans_name": "nnUNetPlans", "continue_training": False,
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": patch,
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": config}, "experiment_planner_used": "test",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nnunet_heart_ext.kernels import fused_dice_ce as f
target = GPUTarget("cuda", 90, 32)
for x in ("*fp16", "*bf16", "*fp32"):
    for t in ("*i16", "*fp32"):
        sums = {"x_ptr": x, "t_ptr": t, "w_ptr": "*fp32", "partial_ptr": "*fp32", "N": "i32", "ignore_label": "i32",
                "C": "constexpr", "C_PAD": "constexpr", "BLOCK": "constexpr", "HAS_IGNORE": "constexpr",
                "HAS_WEIGHT": "constexpr"}
        grad = {"x_ptr": x, "t_ptr": t, "w_ptr": "*fp32", "coef_ptr": "*fp32", "grad_output_ptr": "*fp32",
                "grad_ptr": x, "N": "i32", "ignore_label": "i32", "C": "constexpr", "C_PAD": "constexpr",
                "BLOCK": "constexpr", "HAS_IGNORE": "constexpr", "HAS_WEIGHT": "constexpr", "ROUND_BF16": "constexpr"}
        weighted = t == "*fp32"  # each kernel compiled with and without class weights
        for fn, signature, constexprs in [
                (f._sums_kernel, sums, {"C": 4, "C_PAD": 4, "BLOCK": 1024, "HAS_IGNORE": t == "*fp32",
                                        "HAS_WEIGHT": weighted}),
                (f._grad_kernel, grad, {"C": 4, "C_PAD": 4, "BLOCK": 1024, "HAS_IGNORE": t == "*fp32",
                                        "HAS_WEIGHT": weighted, "ROUND_BF16": x == "*bf16"})]:
            assert triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=target).asm["cubin"]
            print("compiled", fn.__name__, x, t)
final = {"partial_ptr": "*fp32", "w_ptr": "*fp32", "loss_ptr": "*fp32", "coef_ptr": "*fp32", "B": "i32", "P": "i32",
         "smooth": "fp32", "alpha": "fp32", "beta": "fp32", "weight_ce": "fp32", "weight_dice": "fp32",
         "C": "constexpr", "C_PAD": "constexpr", "B_PAD": "constexpr", "P_BLOCK": "constexpr",
         "BATCH_DICE": "constexpr", "FIRST": "constexpr", "HAS_WEIGHT": "constexpr"}
for batch_dice in (True, False):
    constexprs = {"C": 4, "C_PAD": 4, "B_PAD": 2, "P_BLOCK": 256, "BATCH_DICE": batch_dice, "FIRST": 1,
                  "HAS_WEIGHT": batch_dice}
    assert triton.compile(ASTSource(fn=f._finalize_kernel, signature=final, constexprs=constexprs),
                          target=target).asm["cubin"]
    print("compiled _finalize_kernel", batch_dice)
"""


@pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the compiled tests run the kernels themselves")
def test_kernels_compile_for_a_gpu_without_one():
    """CI has no GPU, and the interpreter accepts code the compiler rejects (a 3D reduction in a
    loop crashed Triton's thread-locality pass once): compile every kernel for an H100 (sm_90,
    Triton's own ptxas) in a process without TRITON_INTERPRET."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 14


# ------------------------------------------------------------------ Tversky + CE
def tversky_reference(logits, target, *, alpha, beta, batch_dice, do_bg, smooth=1e-5, ignore_label=None,
                      weight_ce=1.0, weight_dice=1.0, ce_weight=None):
    """Tversky + CE written out in float64 torch with autograd (not the fused maths):
    T_k = (2 I + s) / max(2 I + 2 alpha (P - I) + 2 beta (G - I) + s, 1e-8); CE with class weights
    w: sum_v m w_t ce_v / sum_v m w_t."""
    x = logits.detach().cpu().double().requires_grad_()
    t = target.cpu().long()[:, 0]
    C = x.shape[1]
    mask = torch.ones_like(t, dtype=torch.float64) if ignore_label is None else (t != ignore_label).double()
    t = torch.where(t == (ignore_label if ignore_label is not None else -1), 0, t)
    p = torch.softmax(x, 1)
    y = torch.nn.functional.one_hot(t, C).movedim(-1, 1).double()
    m = mask[:, None]
    axes = tuple(range(2, x.ndim))
    inter, pred, gt = (p * y * m).sum(axes), (p * m).sum(axes), (y * m).sum(axes)
    if batch_dice:
        inter, pred, gt = inter.sum(0), pred.sum(0), gt.sum(0)
    den = 2 * inter + 2 * alpha * (pred - inter) + 2 * beta * (gt - inter) + smooth
    tversky = (2 * inter + smooth) / den.clamp_min(1e-8)
    first = 0 if do_bg else 1
    if ce_weight is not None:
        mask = mask * torch.tensor(ce_weight, dtype=torch.float64)[t]
    ce_voxels = -(torch.log_softmax(x, 1) * y).sum(1) * mask
    ce = ce_voxels.sum() / mask.sum() if mask.sum() > 0 else ce_voxels.sum() * 0
    value = weight_ce * ce - weight_dice * tversky[..., first:].mean()
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(2, 4, 23, 19), (2, 4, 9, 11, 13), (3, 6, 7, 10, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch_dice", [False, True], ids=["sample_dice", "batch_dice"])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.7), (0.7, 0.3), (0.1, 0.9), (1.0, 1.0)])
def test_tversky_matches_a_float64_reference(device, backend, shape, batch_dice, alpha, beta):
    logits, target = random_case(shape, seed=hash((shape, alpha)) % 2**31)
    value, grad, _ = fused(logits, target, device, backend, grad_output=0.75, batch_dice=batch_dice, alpha=alpha,
                           beta=beta)
    assert_close_fp32(value, grad, *tversky_reference(logits, target, alpha=alpha, beta=beta, batch_dice=batch_dice,
                                                       do_bg=False))


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("kind", ["absent_class", "all_background", "single_voxel_class"])
def test_tversky_edge_targets_and_ignore_label(device, backend, kind):
    logits, target = edge_target(kind, (2, 4, 19, 33), seed=53)
    target[:, :, :3] = 4  # an ignored band
    kw = dict(alpha=0.3, beta=0.7, batch_dice=True, do_bg=False, ignore_label=4)
    value, grad, _ = fused(logits, target, device, backend, **kw)
    assert torch.isfinite(grad).all()
    assert_close_fp32(value, grad, *tversky_reference(logits, target, **kw))


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tversky_half_precision(device, backend, dtype):
    logits, target = random_case((2, 4, 16, 32, 32), seed=59)
    logits = logits.to(dtype)
    ref_value, ref_grad = tversky_reference(logits, target, alpha=0.3, beta=0.7, batch_dice=False, do_bg=False)
    value, grad, _ = fused(logits, target, device, backend, grad_output=AMP_GRAD_OUTPUT, batch_dice=False,
                           alpha=0.3, beta=0.7)
    assert abs(value - ref_value) / abs(ref_value) <= 2e-3
    best = (ref_grad * AMP_GRAD_OUTPUT).to(dtype).double() / AMP_GRAD_OUTPUT
    assert (grad - best).norm() / ref_grad.norm() <= 2e-3


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_tversky_at_one_half_is_nnunets_dice(device, backend):
    """alpha = beta = 0.5 is nnU-Net's DC_and_CE_loss, smoothing included, through the module."""
    logits, target = random_case((2, 4, 9, 12, 10), seed=61, ignore_label=4)
    soft_dice = {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}
    x = logits.to(device).requires_grad_()
    value = FusedDiceCELoss(dict(soft_dice), {}, ignore_label=4, alpha=0.5, beta=0.5)(x, target.to(device))
    value.backward()
    ref_value, ref_grad = reference(logits, target, batch_dice=True, do_bg=False, ignore_label=4)
    assert_close_fp32(value.detach().cpu().double(), x.grad.cpu().double(), ref_value, ref_grad)


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_tversky_deep_supervision(device, backend):
    patch = np.prod(PLAN_POOLING, axis=0).tolist()
    logits, targets, weights = deep_supervision_case(patch, num_classes=4, batch=2, seed=67)
    ours = DeepSupervisionWrapper(FusedDiceCELoss({"batch_dice": False, "smooth": 1e-5, "do_bg": False,
                                                   "ddp": False}, {}, alpha=0.3, beta=0.7), weights)
    xs = [x.to(device).requires_grad_() for x in logits]
    value = ours(xs, [t.to(device) for t in targets])
    value.backward()
    total = 0.0
    for x, t, w, ours_x in zip(logits, targets, weights, xs):
        if w == 0:
            assert ours_x.grad is None
            continue
        ref_value, ref_grad = tversky_reference(x, t, alpha=0.3, beta=0.7, batch_dice=False, do_bg=False)
        total += w * ref_value.item()
        err = (ours_x.grad.cpu().double() / w - ref_grad).abs().max() / ref_grad.abs().max()
        assert err <= 1e-4
    assert abs(value.item() - total) / abs(total) <= 1e-5


def test_tversky_arguments_are_checked():
    logits, target = random_case((2, 4, 9, 10), seed=71)
    with pytest.raises(ValueError, match="alpha and beta"):
        fused_dice_ce(logits, target, batch_dice=True, alpha=-0.1, beta=0.5)
    with pytest.raises(ValueError, match="alpha and beta"):
        fused_dice_ce(logits, target, batch_dice=True, alpha=0.0, beta=0.0)


def test_heart_trainer_tversky_variant(monkeypatch, tmp_path):
    pytest.importorskip("SimpleITK")  # nnUNetTrainer needs it
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    from nnunet_heart_ext.trainers import HeartTrainer_tversky, HeartTrainer_tversky_250epochs

    patch = np.prod(PLAN_POOLING, axis=0).tolist()
    for cls in (HeartTrainer_tversky, HeartTrainer_tversky_250epochs):
        trainer = cls(_plans(patch), "3d_fullres", 0, _DATASET_JSON, device=torch.device("cpu"))
        loss = trainer._build_loss()
        assert isinstance(loss, DeepSupervisionWrapper) and isinstance(loss.loss, FusedDiceCELoss)
        assert (loss.loss.alpha, loss.loss.beta) == (0.3, 0.7)
        assert trainer.oversample_foreground_percent == 0.5
    assert trainer.num_epochs == 250
    logits, targets, _ = deep_supervision_case(patch, 4, 2, seed=73)
    value = loss([x.clone().requires_grad_() for x in logits], targets)
    expected = sum(w * tversky_reference(x, t, alpha=0.3, beta=0.7, batch_dice=True, do_bg=False)[0].item()
                   for x, t, w in zip(logits, targets, loss.weight_factors) if w != 0)
    assert abs(value.item() - expected) / abs(expected) <= 1e-5


# ---------------------------------------------------------------- class-weighted cross-entropy
def test_heart_trainer_ce_class_weights(monkeypatch, tmp_path):
    """ce_class_weights (label -> weight, 1 if missing) go into nnU-Net's DC_and_CE_loss as its CE's
    weight and from there into the fused loss: same value as nnU-Net's weighted loss."""
    pytest.importorskip("SimpleITK")  # nnUNetTrainer needs it
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    from nnunet_heart_ext.trainers import HeartTrainer

    patch = np.prod(PLAN_POOLING, axis=0).tolist()
    trainer = HeartTrainer(_plans(patch), "3d_fullres", 0, _DATASET_JSON, device=torch.device("cpu"))
    trainer.ce_class_weights = {2: 3.0, 3: 30.0}
    loss = trainer._build_loss()
    assert isinstance(loss.loss, FusedDiceCELoss) and loss.loss.ce_weight == (1.0, 1.0, 3.0, 30.0)
    logits, targets, _ = deep_supervision_case(patch, 4, 2, seed=79)
    value = loss([x.clone() for x in logits], targets)
    expected = sum(w * reference(x, t, batch_dice=True, do_bg=False, ce_weight=(1.0, 1.0, 3.0, 30.0))[0].item()
                   for x, t, w in zip(logits, targets, loss.weight_factors) if w != 0)
    assert abs(value.item() - expected) / abs(expected) <= 1e-5
    plain = HeartTrainer(_plans(patch), "3d_fullres", 0, _DATASET_JSON, device=torch.device("cpu"))._build_loss()
    assert plain.loss.ce_weight is None and abs(plain(logits, targets).item() - value.item()) > 1e-3


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(2, 4, 23, 19), (2, 4, 9, 11, 13), (3, 6, 7, 10, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch_dice", [False, True], ids=["sample_dice", "batch_dice"])
@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignore_label"])
def test_class_weighted_ce_matches_nnunet(device, backend, shape, batch_dice, ignore):
    """ce_weight is nnU-Net's DC_and_CE_loss with ce_kwargs={'weight': w} (torch's weighted mean over
    the voxels, ignored voxels left out), value and gradient, with and without Tversky's weights."""
    C = shape[1]
    ignore_label = C if ignore else None
    logits, target = random_case(shape, seed=hash((shape, batch_dice, ignore)) % 2**31, ignore_label=ignore_label)
    ce_weight = tuple(float(w) for w in np.random.default_rng(C).uniform(0.2, 30.0, C))
    value, grad, _ = fused(logits, target, device, backend, grad_output=AMP_GRAD_OUTPUT, batch_dice=batch_dice,
                           ignore_label=ignore_label, ce_weight=ce_weight)
    assert_close_fp32(value, grad, *reference(logits, target, batch_dice=batch_dice, do_bg=False,
                                              ignore_label=ignore_label, ce_weight=ce_weight))
    # with Tversky: against the float64 reference, with the weighted CE
    value, grad, _ = fused(logits, target, device, backend, batch_dice=batch_dice, ignore_label=ignore_label,
                           ce_weight=ce_weight, alpha=0.3, beta=0.7)
    assert_close_fp32(value, grad, *tversky_reference(logits, target, batch_dice=batch_dice, do_bg=False, alpha=0.3,
                                                      beta=0.7, ignore_label=ignore_label, ce_weight=ce_weight))


@pytest.mark.parametrize("device,backend", PATHS, ids=PATH_IDS)
def test_class_weighted_ce_edge_cases(device, backend):
    """All-ones weights are the unweighted loss; a weight of 0 drops that class from the CE; weights
    on a class absent from the batch change nothing; half precision within the fp16 tolerance."""
    logits, target = random_case((2, 4, 9, 11, 13), seed=41)
    plain = fused(logits, target, device, backend, batch_dice=True)
    ones = fused(logits, target, device, backend, batch_dice=True, ce_weight=(1.0, 1.0, 1.0, 1.0))
    assert abs(plain[0] - ones[0]) <= 1e-6 * abs(plain[0]) and torch.allclose(plain[1], ones[1], rtol=0, atol=1e-7)
    zero = (1.0, 0.0, 2.0, 5.0)
    assert_close_fp32(*fused(logits, target, device, backend, batch_dice=True, ce_weight=zero)[:2],
                      *reference(logits, target, batch_dice=True, do_bg=False, ce_weight=zero))
    absent = target.clone()
    absent[absent == 3] = 0
    assert_close_fp32(*fused(logits, absent, device, backend, batch_dice=False, ce_weight=(1.0, 1.0, 1.0, 50.0))[:2],
                      *reference(logits, absent, batch_dice=False, do_bg=False, ce_weight=(1.0, 1.0, 1.0, 50.0)))
    for dtype in (torch.float16, torch.bfloat16):
        value, grad, grad_dtype = fused(logits.to(dtype), target, device, backend, grad_output=AMP_GRAD_OUTPUT,
                                        batch_dice=True, ce_weight=zero)
        ref_value, ref_grad = reference(logits.to(dtype), target, batch_dice=True, do_bg=False, ce_weight=zero)
        assert grad_dtype == dtype and abs(value - ref_value) / abs(ref_value) <= 2e-3
        rounded = ref_grad.to(dtype).double()
        assert (grad - rounded).norm() / ref_grad.norm() <= 2e-3
    with pytest.raises(ValueError, match="ce_weight"):
        fused_dice_ce(logits, target, batch_dice=True, ce_weight=(1.0, 2.0))
    with pytest.raises(ValueError, match="ce_weight"):
        fused_dice_ce(logits, target, batch_dice=True, ce_weight=(1.0, -1.0, 1.0, 1.0))
