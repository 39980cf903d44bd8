"""How HeartPredictor runs the network's forward passes: one setting per device kind.

nnU-Net runs the network eagerly, in float32 on a CPU and under float16 autocast on a GPU. The
extension's predictor (predictor.py) hands each batch of windows to a `NetworkRunner`, which runs it
the way the setting says. The settings are constructor arguments of the runner; the predictor takes
them from the environment, so that nnU-Net's own commands reach them:

| setting (environment variable) | value | the network runs |
|---|---|---|
| `NNUNET_HEART_EXT_CPU_NETWORK` | `auto` (default) | `openvino-float32` where OpenVINO is installed (`pip install nnunet-heart-ext[openvino]`), else `float32` |
| | `float32` | nnU-Net's way: eager PyTorch, float32 (results as nnU-Net's up to summation order) |
| | `openvino-float32` | OpenVINO's CPU runtime in float32 (labels as nnU-Net's float32 ones) |
| | `openvino` | OpenVINO's CPU runtime, bfloat16 inference precision where the CPU has it (AVX512-BF16 or AMX; else float32) |
| | `bf16` | eager PyTorch under bfloat16 autocast (oneDNN's bf16 convolutions) |
| `NNUNET_HEART_EXT_CUDA_NETWORK` | `nnunet` (default) | nnU-Net's way: eager, float16 autocast |
| | `bf16` | eager, bfloat16 autocast |
| | `compile` | `torch.compile` (inductor), float16 autocast |
| | `cudagraphs` | `torch.compile(mode="reduce-overhead")`: CUDA graphs of the fixed batch shape (the last batch of a case is padded to it), float16 autocast |

Why `auto` is OpenVINO in float32: benchmarks/bench_network.py measures every option on the same
weights against nnU-Net's predictor, and benchmarks/network_accuracy.py on the demo's trained models
(RESULTS.md, "The network on the CPU"). The bfloat16 paths are the fastest (ResEnc M 3.3x, the
demo's network 5.2x on this project's CPU) but their labels agreed with nnU-Net's float32 ones to a
Dice of 0.9945 on one trained model's valve, below the 0.995 the project holds the default to;
OpenVINO in float32 agreed to 0.99997 or better. `float32` turns every fast path off.

OpenVINO converts the PyTorch module once per set of weights (`weights`: the fold being predicted,
or the parameters' identity and version counters outside the fold loop), then compiles it once per
batch size and thread count; the compiled models are kept for the predictor's life (one per fold).
"""
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
    return CpuNetwork.OPENVINO_FLOAT32 if openvino_available() else CpuNetwork.FLOAT32


def describe(network: "NetworkRunner") -> str:
    if network.device.type == "cuda":
        return f"CUDA network: {network.cuda.value}"
    path = network.cpu_path
    extra = ""
    if path is CpuNetwork.OPENVINO:
        extra = " (bfloat16)" if cpu_has_bf16() else " (float32: no bfloat16 on this CPU)"
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
                                      bf16=path is CpuNetwork.OPENVINO and cpu_has_bf16())

    def _fingerprint(self) -> Tuple:
        return tuple((p.data_ptr(), p._version) for p in self.network.parameters())

    def _openvino_forward(self, x: torch.Tensor, weights: Hashable, *, bf16: bool) -> torch.Tensor:
        import numpy as np
        import openvino as ov

        threads = torch.get_num_threads()
        key = (weights, tuple(x.shape), bf16, threads)
        request = self._compiled.get(key)
        if request is None:
            model = self._openvino.get(weights)
            if model is None:
                # a new set of weights: the compiled models of the old ones go (one fold's at a time
                # outside the fold loop; the fold loop's are kept, one per fold)
                if not isinstance(weights, tuple) or weights[:1] != ("fold",):
                    self._drop(lambda k: not (isinstance(k, tuple) and k[:1] == ("fold",)))
                example = torch.zeros((1, *x.shape[1:]), dtype=torch.float32)
                with torch.inference_mode(False), torch.no_grad():
                    model = ov.convert_model(self.network, example_input=example,
                                             input=[ov.PartialShape([-1, *x.shape[1:]])])
                self._openvino[weights] = model
            model.reshape(list(x.shape))
            config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "INFERENCE_NUM_THREADS": threads,
                      "PERFORMANCE_HINT": "LATENCY"}
            request = self._compiled[key] = ov.Core().compile_model(model, "CPU", config).create_infer_request()
        out = request.infer({0: np.ascontiguousarray(x.detach().cpu().float().numpy())})[0]
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
