"""Fused softmax + Dice + CE loss against nnU-Net's DC_and_CE_loss (MemoryEfficientSoftDiceLoss),
both inside nnU-Net's DeepSupervisionWrapper with nnU-Net's weights, forward + backward.

CUDA (when there is one): B=2, C=4, fp16 logits as AMP gives them, int16 labels as nnU-Net's data
loader gives them, patches 128^3 and 160x320x256 with the deep-supervision outputs of the plan
nnU-Net's planner makes for them. Losses: fused (Triton), nnU-Net eager, nnU-Net with its Dice
torch.compile'd (what nnUNetTrainer does on CUDA). Time, peak memory above the inputs (the
logits' gradients included), and the fused loss's traffic floor (3 x the logits: two reads and the
gradient write, + 2 x the labels) as bytes/s and as a share of the measured device copy
bandwidth. Then one whole AMP training step of nnU-Net's ResEnc-M network with each loss.

CPU (always): the same comparison for the torch path at sizes a CPU handles, fp32 (nnU-Net trains
without AMP on a CPU), and one training step of a small ResEnc network.
`python -m benchmarks --only loss [--quick]`.
"""
import time

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from benchmarks.common import RESULTS_DIR, print_table, report, time_call
from nnunet_heart_ext.kernels._triton import tl, triton
from nnunet_heart_ext.kernels.fused_dice_ce import FusedDiceCELoss

SPACING = [0.5, 0.41, 0.41]  # a CT heart spacing; the planner derives the pooling from it
NUM_CLASSES = 4
BATCH = 2
SOFT_DICE = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}  # 3d_fullres default


def add_arguments(parser):
    parser.add_argument("--loss-repeat", type=int, default=10, help="timed runs a loss (GPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip nnU-Net's compiled Dice")
    parser.add_argument("--budget-s", type=float, default=170,
                        help="start no new section after this many seconds")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads for the CPU part (1: steadier on a shared machine)")
    parser.add_argument("--loss-devices", default="cuda,cpu",
                        help="which parts to run: cuda, cpu or both (gpu_check.sh: cuda)")


def plan_pooling(patch):
    return [list(p) for p in get_pool_and_conv_props(SPACING, list(patch), 4, 999999)[1]]


def deep_supervision_weights(n):
    """nnUNetTrainer._build_loss's weights for n outputs (single process)."""
    weights = np.array([1 / 2 ** i for i in range(n)])
    weights[-1] = 0
    return weights / weights.sum()


def make_losses(device, compile_dice):
    """name -> loss (a DeepSupervisionWrapper for the weights set later)."""
    losses = {"fused": FusedDiceCELoss(dict(SOFT_DICE), {}),
              "nnunet_eager": DC_and_CE_loss(dict(SOFT_DICE), {}, dice_class=MemoryEfficientSoftDiceLoss)}
    if compile_dice:
        compiled = DC_and_CE_loss(dict(SOFT_DICE), {}, dice_class=MemoryEfficientSoftDiceLoss)
        compiled.dc = torch.compile(compiled.dc)
        losses["nnunet_compiled"] = compiled
    return losses


def deep_supervision_inputs(patch, device, dtype, seed=0):
    """Logits (requiring grad) and int16 labels at every deep-supervision scale of the plan."""
    pooling = plan_pooling(patch)
    scales = 1 / np.cumprod(np.vstack(pooling), axis=0)[:-1]
    g = torch.Generator(device=device).manual_seed(seed)
    logits, targets = [], []
    for s in scales:
        shape = [int(round(p * f)) for p, f in zip(patch, s)]
        logits.append((torch.randn((BATCH, NUM_CLASSES, *shape), device=device, generator=g) * 2)
                      .to(dtype).requires_grad_())
        targets.append(torch.randint(0, NUM_CLASSES, (BATCH, 1, *shape), device=device, generator=g)
                       .to(torch.int16))
    return logits, targets


def forward_backward(loss, logits, targets, amp):
    for x in logits:
        x.grad = None
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        value = loss(logits, targets)
    value.backward()


def peak_extra_bytes(fn, device):
    """Peak allocated memory above what was allocated before `fn` (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(device, nbytes=1 << 30):
    """Device-to-device copy: bytes read + written a second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = time_call(lambda: b.copy_(a), repeat=10, warmup=2, sync=torch.cuda.synchronize)
    return 2 * nbytes / t["median_s"]


def time_interleaved(fns: dict, repeat: int, sync=None) -> dict:
    """name -> (min_s, median_s, first_s), the functions run in turn each round so that a busy machine
    slows them alike. The first call of each (compilation, autotuning) is timed apart."""
    sync = sync or (lambda: None)
    first = {}
    for name, fn in list(fns.items()):
        sync()
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # e.g. torch.compile missing a compiler: report the others
            if name == "fused":
                raise
            print(f"bench_loss: {name} failed and is left out: {type(e).__name__}: {e}", flush=True)
            del fns[name]
            continue
        sync()
        first[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t), float(np.median(t)), first[name]) for name, t in times.items()}


def loss_rows(device, patches, dtype, repeat, compile_dice, copy_bw=None):
    sync = torch.cuda.synchronize if device == "cuda" else None
    amp = device == "cuda"
    rows = []
    for patch in patches:
        logits, targets = deep_supervision_inputs(patch, device, dtype)
        weights = deep_supervision_weights(len(logits))
        used = [i for i, w in enumerate(weights) if w != 0]
        elements = sum(logits[i].numel() for i in used)
        voxels = sum(targets[i].numel() for i in used)
        floor = 3 * elements * logits[0].element_size() + 2 * voxels * targets[0].element_size()
        fns = {}
        for name, inner in make_losses(device, compile_dice).items():
            loss = DeepSupervisionWrapper(inner, weights)
            fns[name] = lambda loss=loss: forward_backward(loss, logits, targets, amp)
        timings = time_interleaved(fns, repeat, sync)
        fused_s = timings["fused"][1]  # the fused loss is not allowed to fail
        for name, (min_s, median_s, first_s) in timings.items():
            for x in logits:  # the previous call's gradients are not part of the baseline
                x.grad = None
            extra = peak_extra_bytes(fns[name], device)
            row = {"device": device, "patch": "x".join(map(str, patch)), "outputs": len(logits),
                   "logits": str(dtype).replace("torch.", ""), "loss": name, "fwd_bwd_ms": 1e3 * median_s,
                   "min_ms": 1e3 * min_s, "first_call_s": first_s,
                   "peak_extra_MiB": None if extra is None else extra / 2 ** 20,
                   "floor_MB": floor / 1e6, "GBps_at_floor": None, "pct_copy_bw": None,
                   "time_vs_fused": median_s / fused_s}
            if name == "fused":
                row["GBps_at_floor"] = floor / median_s / 1e9
                if copy_bw:
                    row["pct_copy_bw"] = 100 * floor / median_s / copy_bw
            rows.append(row)
        del logits, targets, fns
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def resenc_network(patch, features, blocks):
    pooling = plan_pooling(patch)
    n = len(pooling)
    return ResidualEncoderUNet(
        input_channels=1, n_stages=n, features_per_stage=[min(features * 2 ** i, 320) for i in range(n)],
        conv_op=torch.nn.Conv3d, kernel_sizes=[[3, 3, 3]] * n, strides=pooling,
        n_blocks_per_stage=list(blocks)[:n] + [blocks[-1]] * (n - len(blocks)), num_classes=NUM_CLASSES,
        n_conv_per_stage_decoder=[1] * (n - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=True)


def training_step_rows(device, patch, features, blocks, repeat, compile_dice):
    """nnUNetTrainer.train_step with each loss: AMP + GradScaler on CUDA, SGD, clip 12."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    amp = device == "cuda"
    g = torch.Generator(device=device).manual_seed(1)
    data = torch.randn((BATCH, 1, *patch), device=device, generator=g)
    _, targets = deep_supervision_inputs(patch, device, torch.float32, seed=2)
    steps = {name: make_training_step(device, patch, features, blocks, amp, inner, data, targets)
             for name, inner in make_losses(device, compile_dice).items()}
    timings = time_interleaved(steps, repeat, sync)
    rows = []
    for name, (min_s, median_s, first_s) in timings.items():
        extra = peak_extra_bytes(steps[name], device)
        rows.append({"device": device, "patch": "x".join(map(str, patch)),
                     "network": f"ResEnc {features}-320 {tuple(blocks)}", "loss": name, "step_ms": 1e3 * median_s,
                     "min_ms": 1e3 * min_s, "peak_MiB": None if extra is None else extra / 2 ** 20,
                     "time_vs_fused": median_s / timings["fused"][1]})
    return rows


def make_training_step(device, patch, features, blocks, amp, inner, data, targets):
    torch.manual_seed(0)
    net = resenc_network(patch, features, blocks).to(device)
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    loss = DeepSupervisionWrapper(inner, deep_supervision_weights(len(targets)))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            value = loss(net(data), targets)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            optimizer.step()
    return step


def kernel_profile(patch, repeat=5):
    """Where the fused loss's time goes on CUDA: kernels (name, launches, device ms) per
    forward + backward under torch.profiler, against the wall time of the same iterations."""
    from torch.profiler import ProfilerActivity, profile

    logits, targets = deep_supervision_inputs(patch, "cuda", torch.float16)
    loss = DeepSupervisionWrapper(FusedDiceCELoss(dict(SOFT_DICE), {}), deep_supervision_weights(len(logits)))
    for _ in range(2):
        forward_backward(loss, logits, targets, True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeat):
            forward_backward(loss, logits, targets, True)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / repeat
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        if device_us > 0 or event.self_cpu_time_total > 0:
            kernels.append({"kernel": event.key[:60], "calls_per_iter": event.count / repeat,
                            "device_ms_per_iter": device_us / 1e3 / repeat,
                            "self_cpu_ms_per_iter": event.self_cpu_time_total / 1e3 / repeat})
    device_total = sum(k["device_ms_per_iter"] for k in kernels if k["self_cpu_ms_per_iter"] == 0)
    kernels.sort(key=lambda k: -max(k["device_ms_per_iter"], k["self_cpu_ms_per_iter"]))
    return {"patch": "x".join(map(str, patch)), "wall_ms_per_iter_profiled": 1e3 * wall,
            "device_ms_per_iter": device_total, "kernels": kernels[:16]}


@triton.jit
def _empty_kernel(x_ptr, N, BLOCK: tl.constexpr):
    """Does nothing: what a launch costs on the host."""
    pass


def launch_overhead():
    """Host cost of one launch: an empty Triton kernel, a one-element torch add, and the fused
    loss's forward + backward on a 2 x 4 x 8^3 input (the device has nothing to do)."""
    x = torch.zeros(8, device="cuda")
    tiny = torch.randn((2, 4, 8, 8, 8), device="cuda", dtype=torch.float16, requires_grad=True)
    target = torch.randint(0, 4, (2, 1, 8, 8, 8), device="cuda", dtype=torch.int16)
    loss = FusedDiceCELoss(dict(SOFT_DICE), {})

    def fused_tiny():
        tiny.grad = None
        loss(tiny, target).backward()

    result = {}
    for name, fn in {"triton_empty_kernel": lambda: _empty_kernel[(1,)](x, 8, BLOCK=8), "torch_add": lambda: x.add_(1),
                     "fused_loss_fwd_bwd_tiny": fused_tiny}.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        result[f"{name}_us"] = (time.perf_counter() - t0) / 500 * 1e6
    print("host cost per call:", {k: round(v, 1) for k, v in result.items()}, flush=True)
    return result


def launch_sweep(patch, repeat):
    """Fused forward + backward at each launch configuration of the Triton kernels."""
    from nnunet_heart_ext.kernels import fused_dice_ce

    saved = dict(fused_dice_ce.LAUNCH)
    logits, targets = deep_supervision_inputs(patch, "cuda", torch.float16)
    loss = DeepSupervisionWrapper(FusedDiceCELoss(dict(SOFT_DICE), {}), deep_supervision_weights(len(logits)))
    rows = []
    try:
        configs = [dict(sums_tile_elements=tile, sums_num_warps=warps, max_programs=programs)
                   for tile in (2048, 4096, 8192) for warps in (4, 8) for programs in (1024, 4096)]
        configs += [dict(grad_tile_elements=tile, grad_num_warps=warps) for tile in (2048, 8192) for warps in (4, 8)]
        for config in configs:
            fused_dice_ce.LAUNCH.update(saved)
            fused_dice_ce.LAUNCH.update(config)
            t = time_call(lambda: forward_backward(loss, logits, targets, True), repeat=repeat, warmup=2,
                          sync=torch.cuda.synchronize)
            rows.append({"patch": "x".join(map(str, patch)), **fused_dice_ce.LAUNCH, "fwd_bwd_ms": 1e3 * t["median_s"]})
    finally:
        fused_dice_ce.LAUNCH.update(saved)
    return rows


def plot(rows, ax):
    labels = [f"{r['device']} {r['patch']}\n{r['loss']}" for r in rows]
    ax.barh(range(len(rows)), [r["fwd_bwd_ms"] for r in rows],
            color=["tab:green" if r["loss"] == "fused" else "tab:gray" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel("forward + backward, ms (median)")
    ax.invert_yaxis()


def main(args):
    quick = getattr(args, "quick", False)
    repeat = 3 if quick else getattr(args, "loss_repeat", 10)
    compile_dice = not getattr(args, "no_compile", False)
    budget_s = getattr(args, "budget_s", 170)
    rows, step_rows, extra = [], [], {"skipped": []}
    sections = []
    devices = getattr(args, "loss_devices", "cuda,cpu").split(",")
    if torch.cuda.is_available() and "cuda" in devices:
        def measure_copy():
            extra["cuda_copy_GBps"] = copy_bandwidth("cuda") / 1e9
            print(f"device copy bandwidth: {extra['cuda_copy_GBps']:.0f} GB/s", flush=True)
        sections.append(("cuda copy bandwidth", measure_copy))
        patches = [(64, 64, 64)] if quick else [(128, 128, 128), (160, 320, 256)]
        for patch in patches:
            sections.append((f"cuda loss {patch}", lambda patch=patch: rows.extend(loss_rows(
                "cuda", [patch], torch.float16, repeat, compile_dice, extra.get("cuda_copy_GBps", 0) * 1e9))))
        sections.append(("cuda launch overhead", lambda: extra.__setitem__("cuda_launch_overhead", launch_overhead())))
        sections.append(("cuda profile", lambda: extra.__setitem__(
            "cuda_profile", [kernel_profile(patch) for patch in patches])))
        step_patch = (64, 64, 64) if quick else (128, 128, 128)
        sections.append((f"cuda training step {step_patch}", lambda: step_rows.extend(training_step_rows(
            "cuda", step_patch, 32, (1, 3, 4, 6, 6, 6), 3 if quick else 5, compile_dice))))
        sections.append(("cuda launch sweep", lambda: extra.__setitem__(
            "cuda_launch_sweep", launch_sweep(patches[-1], 3 if quick else 10))))
    if "cpu" in devices:
        # CPU: fp32 as nnU-Net trains there, eager (nnU-Net compiles only on CUDA)
        cpu_patches = [(32, 32, 32)] if quick else [(64, 64, 64), (64, 128, 128)]
        sections.append(("cpu loss", lambda: rows.extend(loss_rows("cpu", cpu_patches, torch.float32,
                                                                    3 if quick else 10, False))))
        sections.append(("cpu training step", lambda: step_rows.extend(training_step_rows(
            "cpu", (32, 32, 32) if quick else (64, 64, 64), 8, (1, 1, 2, 2, 2, 2), 2 if quick else 5, False))))

    threads = torch.get_num_threads()
    start = time.perf_counter()
    for name, run in sections:
        if time.perf_counter() - start > budget_s:
            extra["skipped"].append(f"{name}: time budget of {budget_s} s spent")
            continue
        if name.startswith("cpu"):
            torch.set_num_threads(getattr(args, "cpu_threads", 1) or threads)
            extra["cpu_threads"] = torch.get_num_threads()
        try:
            run()
        except Exception as e:  # an OOM or a compile failure in one section keeps the others' numbers
            extra["skipped"].append(f"{name}: {type(e).__name__}: {e}")
            print(f"bench_loss: {name} failed: {type(e).__name__}: {e}", flush=True)
        finally:
            torch.set_num_threads(threads)
    extra["training_step"] = step_rows
    extra["notes"] = ("fwd_bwd_ms: median over runs of DeepSupervisionWrapper(loss) forward + backward on "
                      "all deep-supervision outputs, the losses run in turn each round; time_vs_fused = this "
                      "row's median / the fused loss's median; "
                      "floor_MB = 3 x logits bytes + 2 x label bytes over the weighted outputs; "
                      "peak_extra_MiB (CUDA) = peak allocation above the inputs, logits' gradients included; "
                      "training step: the network runs eager (nnU-Net would also compile it on CUDA), "
                      "CPU rows use cpu_threads torch threads.")
    print_table(step_rows, "one training step with each loss")
    for profile_ in extra.get("cuda_profile", []):
        print_table(profile_["kernels"], f"fused loss kernels per forward + backward, {profile_['patch']}: "
                    f"{profile_['device_ms_per_iter']:.3f} ms of kernels on the device, "
                    f"{profile_['wall_ms_per_iter_profiled']:.3f} ms wall (profiled)")
    print_table(extra.get("cuda_launch_sweep", []), "fused loss launch configurations")
    if extra["skipped"]:
        print("skipped:", *extra["skipped"], sep="\n  ")
    report("loss", rows, title="Dice + CE with deep supervision, forward + backward",
           plot=plot, extra=extra, results_dir=getattr(args, "out", None) or RESULTS_DIR)
