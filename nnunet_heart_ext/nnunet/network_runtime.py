"""How HeartPredictor runs the network's forward passes: one setting per device kind.

nnU-Net runs the network eagerly, in float32 on a CPU and under float16 autocast on a GPU. The
extension's predictor (predictor.py) hands each batch of windows to a `NetworkRunner`, which runs it
the way the setting says. The settings are constructor arguments of the runner; the predictor takes
them from the environment, so that nnU-Net's own commands reach them:

| setting (environment variable) | value | the network runs |
|---|---|---|
| `NNUNET_HEART_EXT_CPU_NETWORK` | `auto` (default) | `openvino` where OpenVINO is installed (`pip install nnunet-heart-ext[openvino]`) and the CPU computes bfloat16, `openvino-float32` where it is installed and the CPU does not, else `float32` |
| | `float32` | nnU-Net's way: eager PyTorch, float32 (results as nnU-Net's up to summation order) |
| | `openvino` | OpenVINO's CPU runtime in bfloat16 where the CPU has it (AVX512-BF16 or AMX; else float32), the first convolution on the split image (below) |
| | `openvino-float32` | OpenVINO's CPU runtime in float32 (labels as nnU-Net's float32 ones) |
| | `bf16` | eager PyTorch under bfloat16 autocast (oneDNN's bf16 convolutions; the image rounded to bfloat16) |
| `NNUNET_HEART_EXT_CUDA_NETWORK` | `nnunet` (default) | nnU-Net's way: eager, float16 autocast |
| | `bf16` | eager, bfloat16 autocast |
| | `compile` | `torch.compile` (inductor), float16 autocast |
| | `cudagraphs` | `torch.compile(mode="reduce-overhead")`: CUDA graphs of the fixed batch shape (the last batch of a case is padded to it), float16 autocast |

The split image. bfloat16 keeps 8 bits of mantissa. Rounding the CT image and the first
convolution's weights to it is what moved the labels most (measured on the demo's trained models:
with the whole network in bfloat16 one model's valve agreed with nnU-Net's float32 labels to a Dice
of 0.9945; with only the first convolution in float32, to 0.9979). So `openvino` gives the network
`split_image(x)` = [hi, hi, lo] (hi = bf16(x), lo = bf16(x - hi)) and replaces nnU-Net's first
convolution (weights w) by one with weights [wh, wl, wh] (wh = bf16(w), wl = bf16(w - wh)): every
input and weight is exactly a bfloat16 value, the products of a bfloat16 convolution are exact and
its sums float32, so it computes hi*w + lo*wh = x*w to ~2^-16, for three input channels instead of
one (nothing, next to the network). The rest runs in bfloat16. This is taken only where the first
convolution is found (the stem's of ResidualEncoderUNet, the first stage's of PlainConvUNet) and is
seen, while converting, to be applied to the network's input itself. Else `auto` runs the network in
float32 (with a log line) and `openvino` runs it whole in bfloat16, as asked.

Why `auto` is `openvino`: benchmarks/bench_network.py measures every option on the same weights
against nnU-Net's predictor, and benchmarks/network_accuracy.py on the demo's trained models
(RESULTS.md, "The network on the CPU"): `openvino` is the fastest path (about 3x nnU-Net's
predictor on ResEnc M, 5x on the demo's network, on this project's CPU) and its labels agreed with
nnU-Net's float32 ones to a Dice of 0.9976 or better on every class of three trained models, within
the 0.995 the project holds the default to. `float32` turns every fast path off.

OpenVINO converts the PyTorch module once per set of weights (`weights`: the fold being predicted,
or the parameters' identity and version counters outside the fold loop), then compiles it once per
batch size and thread count; the compiled models are kept for the predictor's life (one per fold).
"""
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Dict, Hashable, Optional, Tuple

import torch

CPU_ENV = "NNUNET_HEART_EXT_CPU_NETWORK"
CUDA_ENV = "NNUNET_HEART_EXT_CUDA_NETWORK"


class CpuNetwork(str, Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BF16 = "bf16"
    OPENVINO = "openvino"
    OPENVINO_FLOAT32 = "openvino-float32"


class CudaNetwork(str, Enum):
    NNUNET = "nnunet"
    BF16 = "bf16"
    COMPILE = "compile"
    CUDAGRAPHS = "cudagraphs"


def _parse(enum, text: Optional[str], env: str):
    if text is None or text == "":
        return list(enum)[0]
    try:
        return enum(text.strip().lower())
    except ValueError:
        raise ValueError(f"{env}={text!r}: choose one of {', '.join(e.value for e in enum)}") from None


def cpu_network_from_env(environ) -> CpuNetwork:
    return _parse(CpuNetwork, environ.get(CPU_ENV), CPU_ENV)


def cuda_network_from_env(environ) -> CudaNetwork:
    return _parse(CudaNetwork, environ.get(CUDA_ENV), CUDA_ENV)


@lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where oneDNN's and
    OpenVINO's bf16 kernels run; elsewhere bf16 would be emulated, slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


@lru_cache(maxsize=None)
def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception:
        return False
    return True


def resolve_cpu(choice: CpuNetwork) -> CpuNetwork:
    """The concrete path `auto` stands for on this machine (others as they are)."""
    if choice is not CpuNetwork.AUTO:
        return choice
    if not openvino_available():
        return CpuNetwork.FLOAT32
    return CpuNetwork.OPENVINO if cpu_has_bf16() else CpuNetwork.OPENVINO_FLOAT32


def describe(network: "NetworkRunner") -> str:
    if network.device.type == "cuda":
        return f"CUDA network: {network.cuda.value}"
    path = network.cpu_path
    extra = ""
    if path is CpuNetwork.OPENVINO:
        extra = " (bfloat16, the first convolution on the split image)" if cpu_has_bf16() \
            else " (float32: no bfloat16 on this CPU)"
    return f"CPU network: {path.value}{extra}" + (f" ({CPU_ENV}=auto)" if network.cpu is CpuNetwork.AUTO else "")


class NetworkRunner:
    """Runs `network` on batches of windows (B, C, *patch) -> float32 logits (B, K, *patch), the
    way the settings say (module docstring). `weights` names the network's current parameters: a
    value that changes when they do (the predictor passes the fold's index)."""

    def __init__(self, network: torch.nn.Module, device: torch.device, *, cpu: CpuNetwork = CpuNetwork.AUTO,
                 cuda: CudaNetwork = CudaNetwork.NNUNET, batch: int = 1):
        self.network = network
        self.device = device
        self.cpu = cpu
        self.cuda = cuda
        self.batch = batch  # the fixed batch shape of the CUDA graphs
        self.cpu_path = resolve_cpu(cpu)
        self._openvino: Dict[Hashable, object] = {}  # weights -> converted openvino.Model
        self._compiled: Dict[Tuple, object] = {}  # (weights, shape, bf16, threads) -> openvino.InferRequest
        self._torch_compiled = None

    # -------------------------------------------------------------- CPU
    def __call__(self, x: torch.Tensor, weights: Optional[Hashable] = None) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._cuda(x)
        if self.device.type != "cpu":  # mps and the like: nnU-Net's way
            return self.network(x).float()
        path = self.cpu_path
        if path is CpuNetwork.FLOAT32:
            return self.network(x)
        if path is CpuNetwork.BF16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.network(x).float()
        return self._openvino_forward(x, weights if weights is not None else self._fingerprint(),
                                      bf16=path is CpuNetwork.OPENVINO and cpu_has_bf16(),
                                      whole_bf16=self.cpu is not CpuNetwork.AUTO)

    def _fingerprint(self) -> Tuple:
        return tuple((p.data_ptr(), p._version) for p in self.network.parameters())

    def _openvino_forward(self, x: torch.Tensor, weights: Hashable, *, bf16: bool, whole_bf16: bool = True
                          ) -> torch.Tensor:
        import numpy as np

        threads = torch.get_num_threads()
        key = (weights, tuple(x.shape), bf16, threads)
        request = self._compiled.get(key)
        converted = self._openvino.get(weights)
        if request is None:
            if converted is None:
                # a new set of weights: the compiled models of the old ones go (one fold's at a time
                # outside the fold loop; the fold loop's are kept, one per fold)
                if not isinstance(weights, tuple) or weights[:1] != ("fold",):
                    self._drop(lambda k: not (isinstance(k, tuple) and k[:1] == ("fold",)))
                converted = self._openvino[weights] = _convert(self.network, x, bf16, whole_bf16)
            request = self._compiled[key] = _compile(converted, x.shape, threads)
        x = x.detach().cpu().float()
        data = np.ascontiguousarray((split_image(x) if converted.split_image else x).numpy())
        out = request.infer({0: data}, share_inputs=True)[0]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def _drop(self, which) -> None:
        for k in [k for k in self._openvino if which(k)]:
            del self._openvino[k]
        for k in [k for k in self._compiled if which(k[0])]:
            del self._compiled[k]

    # -------------------------------------------------------------- CUDA
    def _cuda(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if self.cuda is CudaNetwork.BF16 else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            if self.cuda in (CudaNetwork.NNUNET, CudaNetwork.BF16):
                return self.network(x)
            if self._torch_compiled is None:
                mode = "reduce-overhead" if self.cuda is CudaNetwork.CUDAGRAPHS else None
                self._torch_compiled = torch.compile(self.network, mode=mode, dynamic=False)
            n = x.shape[0]
            if self.cuda is CudaNetwork.CUDAGRAPHS and n < self.batch:  # one graph: the fixed batch shape
                x = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
            out = self._torch_compiled(x)[:n]
            return out.clone() if self.cuda is CudaNetwork.CUDAGRAPHS else out  # graph outputs are reused


@dataclass(frozen=True)
class OpenVinoNetwork:
    """The network converted for OpenVINO, and how its input is given to it."""
    model: object  # openvino.Model, its batch dimension dynamic
    bf16: bool  # OpenVINO's inference precision: bfloat16 (else float32)
    split_image: bool  # the input is `split_image(x)`: the first convolution computes in float32's precision


def bf16_parts(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) in float32, each exactly a bfloat16 value: hi = bf16(t), lo = bf16(t - hi), so
    hi + lo is t to 16 bits of mantissa (bfloat16 alone: 8)."""
    t = t.float()
    hi = t.to(torch.bfloat16).float()
    return hi, (t - hi).to(torch.bfloat16).float()


def split_image(x: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) float32 -> (B, 3C, ...): [hi, hi, lo] of `bf16_parts(x)`."""
    hi, lo = bf16_parts(x)
    return torch.cat([hi, hi, lo], 1)


def first_convolution(network: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The convolution that nnU-Net's U-Nets apply first, to the image itself: the stem's first
    convolution (ResidualEncoderUNet), else the first stage's (PlainConvUNet); None for others."""
    encoder = getattr(network, "encoder", None)
    block = getattr(encoder, "stem", None)
    if block is None:
        stages = getattr(encoder, "stages", None)
        block = stages[0] if stages is not None and len(stages) else None
        while isinstance(block, torch.nn.Sequential) and len(block) and not hasattr(block, "convs"):
            block = block[0]
    convs = getattr(block, "convs", None)
    conv = getattr(convs[0], "conv", None) if convs is not None and len(convs) else None
    if not isinstance(conv, torch.nn.modules.conv._ConvNd) or conv.groups != 1 or conv.transposed:
        return None
    return conv


class _SplitImageConv(torch.nn.Module):
    """The first convolution on `split_image(x)`: weights [wh, wl, wh] on [hi, hi, lo] (wh = bf16(w),
    wl = bf16(w - wh)), every value exactly a bfloat16, so bfloat16 convolution (products exact, sums
    in float32) gives hi*w + lo*wh = x*w up to lo*wl, ~2^-16 of it: the input and the weights are
    not rounded to 8 bits, which is what moved bfloat16's labels most. It also checks that it is
    applied to the network's input (else the network is converted without it)."""

    def __init__(self, conv: torch.nn.modules.conv._ConvNd):
        super().__init__()
        wh, wl = bf16_parts(conv.weight.detach())
        self.conv = type(conv)(3 * conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, 1, conv.bias is not None, conv.padding_mode)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([wh, wl, wh], 1))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach())
        self.input = None
        self.seen = []

    def forward(self, x):
        self.seen.append(x is self.input)
        return self.conv(x)


def _split_image_network(network: torch.nn.Module):
    """(a copy of the network taking `split_image(x)`, its first convolution) or None where the
    network is not one of nnU-Net's U-Nets. The network itself is not changed."""
    import copy

    if first_convolution(network) is None:
        return None
    body = copy.deepcopy(network)
    conv = first_convolution(body)
    split = _SplitImageConv(conv)
    for module in body.modules():  # every place it is held (ConvDropoutNormReLU: .conv and .all_modules[0])
        for name, child in list(module.named_children()):
            if child is conv:
                setattr(module, name, split)

    def remember(module, args):
        split.input = args[0]

    body.register_forward_pre_hook(remember)
    return body, split


def _convert(network: torch.nn.Module, x: torch.Tensor, bf16: bool, whole_bf16: bool = True) -> OpenVinoNetwork:
    """The network for OpenVINO: in float32 as it is; in bfloat16 with its first convolution on the
    split image, where that convolution is found and sees the image only; else the whole network in
    bfloat16 where `whole_bf16` (the user chose `openvino`), in float32 where not (`auto`: the
    whole network in bfloat16 moved a trained model's labels beyond the bound)."""
    import openvino as ov

    def convert(module, example):
        with torch.inference_mode(False), torch.no_grad():
            return ov.convert_model(module, example_input=example,
                                    input=[ov.PartialShape([-1, *example.shape[1:]])])

    example = torch.zeros((1, *x.shape[1:]), dtype=torch.float32)
    made = _split_image_network(network) if bf16 else None
    if made is not None:
        body, split = made
        model = convert(body.eval(), split_image(example))
        split.input = None
        if split.seen and all(split.seen):
            return OpenVinoNetwork(model, True, True)
    if bf16 and not whole_bf16:
        print("nnunet_heart_ext: CPU network: openvino-float32: the network's first convolution is not one this "
              f"path knows to take on the split image ({type(network).__name__}), and bfloat16 throughout would "
              "move its labels", flush=True)
        bf16 = False
    return OpenVinoNetwork(convert(network, example), bf16, False)


def _compile(converted: OpenVinoNetwork, shape, threads: int):
    """An infer request for inputs of `shape` (B, C, *patch)."""
    import openvino as ov

    model = converted.model
    model.reshape([shape[0], *[d.get_length() for d in list(model.input(0).get_partial_shape())[1:]]])
    config = {"INFERENCE_PRECISION_HINT": "bf16" if converted.bf16 else "f32", "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY"}
    return ov.Core().compile_model(model, "CPU", config).create_infer_request()
