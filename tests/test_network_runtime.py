"""How HeartPredictor runs the network (nnunet_heart_ext/nnunet/network_runtime.py), every CPU path
against nnU-Net's own predictor (imported from the installed nnunetv2) on a small residual-encoder
U-Net of dynamic_network_architectures (nnU-Net's network classes: instance norm, leaky ReLU,
strided and pooled skips), with the same folds' weights and mirroring; the settings and their
errors; the fold cache; out-of-memory halving the batch for one call only."""

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
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
    (True, True, CpuNetwork.OPENVINO_FLOAT32), (True, False, CpuNetwork.FLOAT32)])
def test_auto_is_openvino_in_float32_where_installed(monkeypatch, bf16, openvino, expected):
    """bfloat16 is never the default (its labels moved beyond the bounds on a trained model)."""
    monkeypatch.setattr(network_runtime, "cpu_has_bf16", lambda: bf16)
    monkeypatch.setattr(network_runtime, "openvino_available", lambda: openvino)
    assert network_runtime.resolve_cpu(CpuNetwork.AUTO) is expected
    assert network_runtime.resolve_cpu(CpuNetwork.FLOAT32) is CpuNetwork.FLOAT32


def test_out_of_memory_halves_the_batch_for_that_call_only(monkeypatch):
    plain, heart = pair(1)
    heart.cpu_network = "float32"
    heart.inference_batch = 8
    seen = []
    real = NetworkRunner.__call__

    def fake(self, x, weights=None):
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return real(self, x, weights)

    monkeypatch.setattr(NetworkRunner, "__call__", fake)
    data = image(7)
    ref = plain.predict_logits_from_preprocessed_data(data).float().numpy()
    got = heart.predict_logits_from_preprocessed_data(data).numpy()
    close(got, ref)
    assert seen[:3] == [8, 4, 2] and max(seen[2:]) == 2  # 8 fails, then 4 fails, then 2 a pass
    assert heart._batch() == 8  # the next call starts from the setting again
    seen.clear()
    heart.predict_logits_from_preprocessed_data(data)
    assert seen[0] == 8


def test_cuda_graph_path_pads_the_last_batch_to_the_fixed_shape(monkeypatch):
    """The `cudagraphs` runner feeds the compiled network one batch shape; a smaller last batch is
    padded and its outputs cut back (checked on the CPU: autocast and compile are replaced by
    recorders, the CUDA graphs themselves need a GPU: benchmarks/gpu_check.sh)."""
    net = unet(0)
    shapes = []

    def compiled(x):
        shapes.append(tuple(x.shape))
        return net(x)

    monkeypatch.setattr(torch, "compile", lambda module, mode=None, dynamic=None: compiled)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: torch.autograd.profiler.record_function("autocast"))
    runner = NetworkRunner(net, torch.device("cuda"), cuda=CudaNetwork.CUDAGRAPHS, batch=4)
    x = image(0, (3, 1, *PATCH))
    with torch.no_grad():
        out = runner(x)
        ref = net(x)
    assert shapes == [(4, 1, *PATCH)] and out.shape == ref.shape
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)


# ---------------------------------------------------------------------- CUDA (benchmarks/gpu_check.sh)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("choice", list(CudaNetwork))
def test_every_cuda_path_against_nnunets_predictor_on_the_cpu(choice):
    plain, heart = pair(2)
    heart.device, heart.perform_everything_on_device = torch.device("cuda"), True
    heart.cuda_network = choice.value
    heart.inference_batch = 4
    data = image(5)
    ref = plain.predict_logits_from_preprocessed_data(data).float().numpy()[INNER]
    got = heart.predict_logits_from_preprocessed_data(data).float().cpu().numpy()[INNER]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 0.05, f"{choice.value}: max error {err:.4f} of the logits' range"
    assert (got.argmax(0) == ref.argmax(0)).mean() >= 0.98
