"""The network's forward passes on this CPU: nnU-Net's predictor against each of the extension's paths.

Two networks, built by nnU-Net's own `get_network_from_plans` from the plans they are trained with:
- ResEnc M of HeartPlans (benchmarks/data/HeartPlans_fullsize.json, patch 96 x 160 x 160), one
  window (an image the size of the patch);
- the demo's network (benchmarks/data/HeartDemoPlans.json, a copy of what `--demo` plans: patch
  24 x 56 x 48, 8-64 features), on an image of the demo's median preprocessed size (62 x 124 x 124).
Same random weights for every row, mirroring on (8 passes a window), step 0.5, one fold:
`predict_logits_from_preprocessed_data`, what nnUNetv2_predict calls per case. Rows: nnU-Net's
`nnUNetPredictor` (trainer nnUNetTrainer), then the extension's HeartPredictor (trainer
HeartTrainer) with each NNUNET_HEART_EXT_CPU_NETWORK value (network_runtime.py). Each row is
warmed up with one call without mirroring (OpenVINO converts the network there: `setup_s`), then
timed. Ratios are against nnU-Net's row of the same run; `max_err` is the largest difference of the
mean logits from nnU-Net's, as a fraction of their range, `labels` the fraction of voxels whose
arg-max agrees (random weights: small margins; trained weights: benchmarks/network_accuracy.py).

On a GPU (`--network-device cuda`, benchmarks/gpu_check.sh's `network` section; prepared on a
CPU-only machine, never run yet): ResEnc M on a quarter of a full-size case (170 x 234 x 234 voxels at
HeartPlans' spacing), one fold, mirroring on, at step 0.5 and at 0.15 (the contestants' setting),
nnU-Net's predictor (its float16 autocast, eager) against the extension with each
NNUNET_HEART_EXT_CUDA_NETWORK value; then the training step (forward, backward, SGD step at
HeartPlans' batch 2, float16 autocast and gradient scaling as nnU-Net's trainer does): eager,
nnU-Net's `torch.compile` (its default on a GPU, the baseline), and compiled with bfloat16 autocast.

`python -m benchmarks --only network [--quick] [--network-nets resencm,demo] [--network-repeat 1]
 [--network-device cuda]`
"""
import copy
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import report

DATA = Path(__file__).resolve().parent / "data"
NETS = {"resencm": (DATA / "HeartPlans_fullsize.json", None),
        "demo": (DATA / "HeartDemoPlans.json", (62, 124, 124))}
DATASET_JSON = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1,
                "labels": {"background": 0, "myocardium": 1, "aortic_valve": 2, "calcification": 3}}


def add_arguments(parser):
    parser.add_argument("--network-nets", default="resencm,demo", help="resencm,demo")
    parser.add_argument("--network-repeat", type=int, default=1, help="timed calls a row (the minimum is kept)")
    parser.add_argument("--network-options", default=None,
                        help="NNUNET_HEART_EXT_CPU_NETWORK (or, on cuda, _CUDA_NETWORK) values to time "
                             "(default: all that run here)")
    parser.add_argument("--network-device", default="cpu", help="cpu or cuda")


def build(plans_file: Path):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(json.loads(plans_file.read_text()))
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 4, allow_init=True,
                                 deep_supervision=False)
    return pm, cm, net.eval()


def predictor(trainer: str, net, pm, cm, mirror: bool, device: str = "cpu", step: float = 0.5):
    """nnU-Net's predictor of a `trainer` model with `net`'s weights as its one fold."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import nnunet_heart_ext._hook  # noqa: F401

    p = nnUNetPredictor(tile_step_size=step, use_mirroring=mirror, device=torch.device(device), allow_tqdm=False)
    p.manual_initialization(copy.deepcopy(net), pm, cm, [copy.deepcopy(net.state_dict())], DATASET_JSON, trainer,
                            (0, 1, 2))
    return p


def run_net(name: str, options, repeat: int, quick: bool) -> list:
    import torch

    from nnunet_heart_ext.nnunet import network_runtime
    from nnunet_heart_ext.nnunet.predictor import HeartPredictor

    plans_file, shape = NETS[name]
    pm, cm, net = build(plans_file)
    patch = tuple(cm.patch_size)
    if quick:
        shape = patch
    shape = shape or patch
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32))
    rows, ref = [], None
    for option in ["nnU-Net"] + options:
        trainer = "nnUNetTrainer" if option == "nnU-Net" else "HeartTrainer"
        timed = predictor(trainer, net, pm, cm, mirror=False)
        if option != "nnU-Net":
            assert isinstance(timed, HeartPredictor)
            timed.cpu_network = option
        t0 = time.perf_counter()  # warm-up: one pass a window (OpenVINO converts and compiles here)
        timed.predict_logits_from_preprocessed_data(data[:, :patch[0], :patch[1], :patch[2]])
        setup = time.perf_counter() - t0
        timed.use_mirroring = True
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            logits = timed.predict_logits_from_preprocessed_data(data).float().numpy()
            times.append(time.perf_counter() - t0)
        windows = len(timed._internal_get_sliding_window_slicers(data.shape[1:]))
        row = dict(network=name, predictor=option if option == "nnU-Net" else f"extension {option}",
                   windows=windows, passes=windows * 8, time_s=round(min(times), 2),
                   windows_per_s=round(windows / min(times), 3), setup_s=round(setup, 2))
        logits = logits[(slice(None),) + (slice(2, -2),) * 3]  # nnU-Net's float16 Gaussian underflows at the rim
        if ref is None:
            ref = logits
            row.update(speedup=1.0, max_err=0.0, labels=1.0)
        else:
            row.update(speedup=round(rows[0]["time_s"] / row["time_s"], 2),
                       max_err=round(float(np.abs(logits - ref).max() / np.abs(ref).max()), 4),
                       labels=round(float((logits.argmax(0) == ref.argmax(0)).mean()), 5))
        rows.append(row)
        print(row, flush=True)
    rows.append(dict(network=name, predictor="(auto here)", windows=None, passes=None, time_s=None,
                     windows_per_s=None, setup_s=None, speedup=None, max_err=None, labels=None,
                     note=network_runtime.resolve_cpu(network_runtime.CpuNetwork.AUTO).value))
    return rows


def plot(rows, ax):
    nets = sorted({r["network"] for r in rows})
    labels = [r["predictor"] for r in rows if r["network"] == nets[0] and r["time_s"] is not None]
    width = 0.8 / len(nets)
    for i, n in enumerate(nets):
        vals = [next((r["speedup"] for r in rows if r["network"] == n and r["predictor"] == lab), 0) for lab in labels]
        ax.bar(np.arange(len(labels)) + i * width, vals, width, label=n)
    ax.axhline(3, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(labels)) + width * (len(nets) - 1) / 2)
    ax.set_xticklabels(labels, rotation=20, fontsize=7)
    ax.set_ylabel("speed vs nnU-Net's CPU predictor (x)")
    ax.legend()


def run_cuda(options, quick: bool) -> list:
    """The GPU rows (module docstring): sliding window at two steps, then the training step."""
    import torch

    pm, cm, net = build(NETS["resencm"][0])
    shape = tuple(cm.patch_size) if quick else (170, 234, 234)
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32))
    rows = []
    for step in (0.5, 0.15):
        base = None
        for option in ["nnU-Net"] + options:
            p = predictor("nnUNetTrainer" if option == "nnU-Net" else "HeartTrainer", net, pm, cm, mirror=True,
                          device="cuda", step=step)
            if option != "nnU-Net":
                p.cuda_network = option
            t0 = time.perf_counter()
            p.predict_logits_from_preprocessed_data(data[:, :cm.patch_size[0], :cm.patch_size[1], :cm.patch_size[2]])
            torch.cuda.synchronize()
            setup = time.perf_counter() - t0
            t0 = time.perf_counter()
            logits = p.predict_logits_from_preprocessed_data(data)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            logits = logits.float().cpu().numpy()
            windows = len(p._internal_get_sliding_window_slicers(data.shape[1:]))
            row = dict(network="resencm", step=step, predictor=option if option == "nnU-Net" else f"extension {option}",
                       windows=windows, time_s=round(seconds, 2), windows_per_s=round(windows / seconds, 2),
                       setup_s=round(setup, 1))
            if base is None:
                base, ref = row, logits
                row.update(speedup=1.0, labels=1.0)
            else:
                row.update(speedup=round(base["time_s"] / seconds, 2),
                           labels=round(float((logits.argmax(0) == ref.argmax(0)).mean()), 5))
            rows.append(row)
            print(row, flush=True)
            del p, logits
            torch.cuda.empty_cache()
    rows += training_step_rows(pm, cm, quick)
    return rows


def training_step_rows(pm, cm, quick: bool) -> list:
    """Forward + backward + SGD step of ResEnc M at HeartPlans' batch, float16 autocast and gradient
    scaling as nnU-Net's trainer: eager, nnU-Net's torch.compile (its GPU default), compiled bf16."""
    import torch

    rows = []
    for name, compiled, dtype in (("eager float16", False, torch.float16),
                                  ("nnU-Net: compile float16", True, torch.float16),
                                  ("compile bfloat16", True, torch.bfloat16)):
        setup, seconds = _training_step_seconds(cm, compiled, dtype, 3 if quick else 20)
        rows.append(dict(network="resencm", step=None, predictor=f"training step: {name}", windows=None,
                         time_s=round(seconds, 4), windows_per_s=None, setup_s=round(setup, 1)))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()  # the variant's network and optimiser went with its function
    base = rows[1]["time_s"]
    for r in rows:
        r["speedup"] = round(base / r["time_s"], 2)
    return rows


def _training_step_seconds(cm, compiled: bool, dtype, n: int):
    """(seconds of the first 3 steps: compilation, cudnn autotuning; seconds a step after them)."""
    import torch

    _, _, net = build(NETS["resencm"][0])
    net = net.cuda().train()
    model = torch.compile(net) if compiled else net
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    x = torch.randn(cm.batch_size, 1, *cm.patch_size, device="cuda")
    y = torch.randint(0, 4, (cm.batch_size, *cm.patch_size), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return setup, (time.perf_counter() - t0) / n


def main(args) -> None:
    import torch

    from nnunet_heart_ext.nnunet import network_runtime

    if getattr(args, "network_device", "cpu") == "cuda":
        options = args.network_options.split(",") if args.network_options else \
            [o.value for o in network_runtime.CudaNetwork]
        rows = run_cuda(options, args.quick)
        report("network_cuda" + ("_quick" if args.quick else ""), rows,
               title="network passes on the GPU, mirroring on; training step", extra={}, results_dir=args.out)
        return

    options = args.network_options.split(",") if args.network_options else \
        [o.value for o in network_runtime.CpuNetwork if o is not network_runtime.CpuNetwork.AUTO
         and (network_runtime.openvino_available() or not o.value.startswith("openvino"))]
    rows = []
    for name in args.network_nets.split(","):
        rows += run_net(name, options, args.network_repeat, args.quick)
    report("network" + ("_quick" if args.quick else ""), rows,
           title=f"network passes on the CPU ({torch.get_num_threads()} threads), mirroring on", plot=plot,
           extra={"threads": torch.get_num_threads(), "cpu_bf16": network_runtime.cpu_has_bf16()},
           results_dir=args.out)
