"""How HeartPredictor runs the network (nnunet_heart_ext/nnunet/network_runtime.py), every CPU path
against nnU-Net's own predictor (imported from the installed nnunetv2) on a small residual-encoder
U-Net of dynamic_network_architectures (nnU-Net's network classes: instance norm, leaky ReLU,
strided and pooled skips), with the same folds' weights and mirroring; the settings and their
errors; the fold cache; out-of-memory halving the batch for one call only."""

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

import nnunet_heart_ext._hook  # noqa: F401  (installs the hook where the .pth was not processed)
from nnunet_heart_ext.nnunet import network_runtime
from nnunet_heart_ext.nnunet.network_runtime import CpuNetwork, CudaNetwork, NetworkRunner
from nnunet_heart_ext.nnunet.predictor import HeartPredictor
from test_predictor import plans, predictors

PATCH = (16, 16, 16)
HAVE_OPENVINO = network_runtime.openvino_available()
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino not installed (pip install .[openvino])")


def unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = ResidualEncoderUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 4, (1, 1), True,
                              torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                              {"inplace": True}, deep_supervision=False)
    with torch.no_grad():  # trained-looking norms: not all affine weights 1 and biases 0
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def pair(n_folds: int, mirror_axes=(0, 1, 2)):
    """nnU-Net's predictor and the extension's (its network path left to the test or the environment)."""
    made = predictors(n_folds, mirror_axes, plans(patch=PATCH), make_network=unet, cpu_network=None)
    assert type(made[0]) is nnUNetPredictor and type(made[1]) is HeartPredictor
    return made


# nnU-Net's float16 Gaussian weights underflow at the image's outermost voxels (test_predictor.compare)
INNER = (slice(None),) + (slice(2, -2),) * 3


def close(got, ref):
    np.testing.assert_allclose(got[INNER], ref[INNER], atol=2e-2, rtol=2e-2)


def image(seed: int, shape=(1, 20, 26, 23)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# float32: nnU-Net sums in float16 (a few 1e-3 of the range); bfloat16 keeps 8 bits of mantissa:
# logits within a few % of their range, labels nearly all the same
TOLERANCE = {CpuNetwork.FLOAT32: (5e-3, 0.999), CpuNetwork.OPENVINO_FLOAT32: (5e-3, 0.999),
             CpuNetwork.BF16: (0.05, 0.98), CpuNetwork.OPENVINO: (0.05, 0.98)}


@pytest.mark.parametrize("choice", [CpuNetwork.FLOAT32, CpuNetwork.BF16,
                                    pytest.param(CpuNetwork.OPENVINO, marks=needs_openvino),
                                    pytest.param(CpuNetwork.OPENVINO_FLOAT32, marks=needs_openvino)])
def test_every_cpu_path_against_nnunets_predictor(choice):
    """Two folds, mirroring on, windows batched (3 inputs a pass): the mean logits against nnU-Net's."""
    plain, heart = pair(2)
    heart.cpu_network = choice.value
    heart.inference_batch = 3
    data = image(1)
    ref = plain.predict_logits_from_preprocessed_data(data).float().numpy()
    got = heart.predict_logits_from_preprocessed_data(data).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    got, ref = got[INNER], ref[INNER]
    assert heart._network_runner.cpu_path is choice
    scale, agreement = TOLERANCE[choice]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= scale, f"{choice.value}: max error {err:.4f} of the logits' range"
    assert (got.argmax(0) == ref.argmax(0)).mean() >= agreement
    if choice is CpuNetwork.FLOAT32:  # nnU-Net's own passes: the same up to nnU-Net's float16 sum
        close(got, ref)


@needs_openvino
def test_openvino_converts_each_fold_once_and_follows_weights_changed_in_place(monkeypatch):
    """The fold loop keeps one converted model a fold across cases; outside it (nnU-Net's validation
    calls the sliding window itself) weights changed in place are seen."""
    import openvino as ov

    conversions = []
    real = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: conversions.append(1) or real(*a, **k))
    plain, heart = pair(2)
    heart.cpu_network = "openvino-float32"
    for seed in (2, 3):  # two cases
        data = image(seed)
        ref = plain.predict_logits_from_preprocessed_data(data).float().numpy()
        got = heart.predict_logits_from_preprocessed_data(data).numpy()
        close(got, ref)
    assert len(conversions) == 2  # two folds, converted once each

    # validation: the predictor's network is the trainer's, its weights change between calls
    net = heart.network
    net.load_state_dict(unet(5).state_dict())
    first = heart.predict_sliding_window_return_logits(image(4)).numpy()
    plain.network.load_state_dict(unet(5).state_dict())
    close(first, plain.predict_sliding_window_return_logits(image(4)).float().numpy())
    net.load_state_dict(unet(6).state_dict())
    second = heart.predict_sliding_window_return_logits(image(4)).numpy()
    plain.network.load_state_dict(unet(6).state_dict())
    close(second, plain.predict_sliding_window_return_logits(image(4)).float().numpy())
    assert len(conversions) == 4


def test_settings_from_the_environment_and_their_errors(monkeypatch):
    _, heart = pair(1)
    monkeypatch.setenv(network_runtime.CPU_ENV, "Float32")
    monkeypatch.setenv("NNUNET_HEART_EXT_INFERENCE_BATCH", "5")
    heart.predict_logits_from_preprocessed_data(image(0, (1, 16, 16, 16)))
    assert heart._network_runner.cpu_path is CpuNetwork.FLOAT32 and heart._batch() == 5
    heart.inference_batch = 2  # the predictor's own setting wins over the environment
    assert heart._batch() == 2
    heart.inference_batch = None
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("NNUNET_HEART_EXT_INFERENCE_BATCH", bad)
        with pytest.raises(ValueError, match="NNUNET_HEART_EXT_INFERENCE_BATCH"):
            heart._batch()
    monkeypatch.setenv("NNUNET_HEART_EXT_INFERENCE_BATCH", "1")
    monkeypatch.setenv(network_runtime.CPU_ENV, "fp8")
    with pytest.raises(ValueError, match=f"{network_runtime.CPU_ENV}='fp8'.*openvino-float32"):
        heart._runner()
    monkeypatch.setenv(network_runtime.CUDA_ENV, "graphs")
    monkeypatch.setenv(network_runtime.CPU_ENV, "auto")
    with pytest.raises(ValueError, match=f"{network_runtime.CUDA_ENV}='graphs'.*cudagraphs"):
        heart._runner()


@pytest.mark.parametrize("variable,value", [(network_runtime.CPU_ENV, "fp8"),
                                            ("NNUNET_HEART_EXT_INFERENCE_BATCH", "0")])
def test_a_bad_setting_stops_the_prediction_instead_of_falling_back(monkeypatch, variable, value):
    """Outside strict mode a fault of the extension's code falls back to nnU-Net's predictor; a bad
    setting is no fault: the error names it and nothing is predicted."""
    monkeypatch.setenv("NNUNET_HEART_EXT_STRICT", "0")
    monkeypatch.setenv(variable, value)
    _, heart = pair(1)
    with pytest.raises(ValueError, match=variable):
        heart.predict_logits_from_preprocessed_data(image(0, (1, 16, 16, 16)))


@pytest.mark.parametrize("bf16,openvino,expected", [
    (False, True, CpuNetwork.OPENVINO_FLOAT32), (False, False, CpuNetwork.FLOAT32),
    (True, True, CpuNetwork.OPENVINO), (True, False, CpuNetwork.FLOAT32)])
def test_auto_is_openvino_in_bfloat16_where_the_cpu_has_it(monkeypatch, bf16, openvino, expected):
    """OpenVINO where installed: in bfloat16 (the first convolution in float32) where the CPU computes
    bfloat16, else in float32; nnU-Net's float32 without OpenVINO."""
    monkeypatch.setattr(network_runtime, "cpu_has_bf16", lambda: bf16)
    monkeypatch.setattr(network_runtime, "openvino_available", lambda: openvino)
    assert network_runtime.resolve_cpu(CpuNetwork.AUTO) is expected
    assert network_runtime.resolve_cpu(CpuNetwork.FLOAT32) is CpuNetwork.FLOAT32


def plain_unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), 2, 3, 2, True, torch.nn.InstanceNorm3d,
                         {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                         deep_supervision=False).eval()


class ScaledInput(ResidualEncoderUNet):
    """Its first convolution sees 2x the image, not the image: the split must not be taken."""

    def forward(self, x):
        return super().forward(x * 2)


def scaled_input_unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ScaledInput(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1), True,
                       torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                       {"inplace": True}, deep_supervision=False).eval()


def test_split_image_keeps_the_channels_apart():
    """A two-channel image (e.g. CT and a second modality): [hi of each, hi of each, lo of each]
    against weights [wh, wl, wh] of each input channel, so body(split) is network(x)."""
    torch.manual_seed(3)
    net = ResidualEncoderUNet(2, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1), True,
                              torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                              torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=False).eval()
    x = image(11, (1, 2, 16, 16, 16))
    x[:, 1] *= 100  # channels of different scales: mixing them up would show
    body, split = network_runtime._split_image_network(net)
    assert split.conv.in_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(body(network_runtime.split_image(x)), net(x), atol=1e-4, rtol=1e-4)


def test_split_image_is_exact_in_bfloat16_values():
    """hi and lo are bfloat16 values whose sum is x to 2^-16 (bfloat16 alone: 2^-8)."""
    x = image(9, (2, 1, 8, 9, 10)) * 1000 + 3
    parts = network_runtime.split_image(x)
    hi, hi2, lo = parts[:, :1], parts[:, 1:2], parts[:, 2:]
    assert torch.equal(parts, parts.to(torch.bfloat16).float())
    assert torch.equal(hi, hi2)
    assert float(((hi + lo - x).abs() / x.abs()).max()) <= 2.0 ** -16
    assert float(((hi - x).abs() / x.abs()).max()) > 2.0 ** -12  # bfloat16 alone is far coarser


@pytest.mark.parametrize("make", [unet, plain_unet])
def test_the_first_convolution_on_the_split_image_is_float32s_in_bfloat16_arithmetic(make):
    """nnU-Net's U-Nets taking split_image(x): the same logits as network(x) (float32), every input
    and weight of the new first convolution exactly a bfloat16, so a bfloat16 convolution (exact
    products, float32 sums) computes it to ~2^-16, not to bfloat16's 2^-8; the network itself is
    not changed."""
    net = make(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = network_runtime.first_convolution(net)
    assert isinstance(first, torch.nn.Conv3d) and first.in_channels == 1
    body, split = network_runtime._split_image_network(net)
    x = image(7, (2, 1, 16, 16, 16))
    with torch.no_grad():
        ref, got = net(x), body(network_runtime.split_image(x))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert split.seen == [True]
    w = split.conv.weight
    assert torch.equal(w, w.to(torch.bfloat16).float())
    # the arithmetic of a bfloat16 convolution, in float64: bfloat16 values multiplied exactly
    conv = torch.nn.functional.conv3d
    with torch.no_grad():
        exact = conv(x.double(), first.weight.double(), padding=first.padding)
        in_bf16 = conv(network_runtime.split_image(x).double(), w.double(), padding=first.padding)
        plain_bf16 = conv(x.to(torch.bfloat16).double(), first.weight.to(torch.bfloat16).double(), padding=first.padding)
    scale = float(exact.abs().max())
    assert float((in_bf16 - exact).abs().max()) / scale < 2.0 ** -14
    assert float((plain_bf16 - exact).abs().max()) / scale > 2.0 ** -10
    assert network_runtime.first_convolution(net) is first  # the network keeps its own convolution
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert network_runtime.first_convolution(torch.nn.Conv3d(1, 2, 3)) is None  # not a U-Net


@needs_openvino
@pytest.mark.skipif(not network_runtime.cpu_has_bf16(), reason="this CPU has no bfloat16: OpenVINO runs float32")
@pytest.mark.parametrize("make,split", [(unet, True), (plain_unet, True), (scaled_input_unet, False)])
def test_openvino_bf16_takes_the_split_image_where_the_first_convolution_sees_the_image(make, split):
    """OpenVINO in bfloat16 (every convolution, as its compiled model says) on the split image where
    the first convolution sees the image; where it does not (a network scaling its input first),
    the network goes as it is. Either way the logits are the network's, within bfloat16's error."""
    net = make(1)
    runner = NetworkRunner(net, torch.device("cpu"), cpu=CpuNetwork.OPENVINO)
    x = image(8, (2, 1, 16, 16, 16))
    got = runner(x, ("fold", 0))
    with torch.no_grad():
        ref = net(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) > 0.97
    converted = runner._openvino[("fold", 0)]
    assert converted.bf16 and converted.split_image is split
    compiled = runner._compiled[(("fold", 0), tuple(x.shape), True, torch.get_num_threads())].get_compiled_model()
    assert compiled.input(0).get_partial_shape()[1].get_length() == (3 if split else 1)
    ops = compiled.get_runtime_model().get_ordered_ops()
    assert {o.get_rt_info()["runtimePrecision"].astype(str) for o in ops
            if o.get_rt_info()["layerType"].astype(str) == "Convolution"} == {"bf16"}
    got1 = runner(x[:1], ("fold", 0))  # another batch shape: compiled again, converted once
    assert float((got1 - got[:1]).abs().max() / ref.abs().max()) < 0.01
    assert len(runner._openvino) == 1 and len(runner._compiled) == 2


@needs_openvino
@pytest.mark.skipif(not network_runtime.cpu_has_bf16(), reason="this CPU has no bfloat16: OpenVINO runs float32")
@pytest.mark.parametrize("make,bf16", [(unet, True), (scaled_input_unet, False)])
def test_auto_runs_float32_where_the_split_image_cannot_be_taken(make, bf16, capsys):
    """`auto` never runs the whole network in bfloat16 (beyond the bound on a trained model): a
    network whose first convolution does not see the image goes in float32, with a log line."""
    net = make(2)
    runner = NetworkRunner(net, torch.device("cpu"), cpu=CpuNetwork.AUTO)
    assert runner.cpu_path is CpuNetwork.OPENVINO
    x = image(10, (1, 1, 16, 16, 16))
    got = runner(x, ("fold", 0))
    with torch.no_grad():
        ref = net(x)
    converted = runner._openvino[("fold", 0)]
    assert converted.bf16 is bf16 and converted.split_image is bf16
    assert ("openvino-float32" in capsys.readouterr().out) is not bf16
    assert float((got - ref).abs().max() / ref.abs().max()) < (0.05 if bf16 else 1e-4)
