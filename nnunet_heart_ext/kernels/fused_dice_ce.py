"""Fused softmax + soft Dice (or Tversky) + cross-entropy loss: nnU-Net's default loss in two passes.

Same value and gradient as nnU-Net's
`DC_and_CE_loss(soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice, ignore_label,
dice_class=MemoryEfficientSoftDiceLoss)` for logits `x` of shape (B, C, *spatial) and integer
labels `t` of shape (B, 1, *spatial) (float or integer dtype, as nnU-Net gives them). No one-hot
tensor is ever made, and the Triton path stores no probabilities.

Reference maths (v: voxel, k: class, m_v = [t_v != ignore_label], labels at ignored voxels
count as 0, y_kv = [t_v == k], s = smooth, a/b = Tversky's alpha/beta):

    p_kv  = softmax(x)_kv over k
    I_bk  = sum_v m p_kv y_kv      P_bk = sum_v m p_kv      G_bk = sum_v m y_kv
    batch_dice: I, P, G summed over b (and over DDP ranks when ddp=True)
    n_k   = 2 I_k + s
    den_k = 2 I_k + 2a (P_k - I_k) + 2b (G_k - I_k) + s      (a = b = 0.5: G_k + P_k + s)
    T_k   = n_k / max(den_k, 1e-8)       (a = b = 0.5, the default, is nnU-Net's soft Dice exactly)
    Dice  = -mean(T) over k (and b when not batch_dice); k >= 1 unless do_bg
    CE    = sum_bv m w_{t_v} (logsumexp_k x_kv - x_{t_v,v}) / sum_bv m w_{t_v}
            (w: CrossEntropyLoss's class weights, all 1 by default; 0 when the denominator is 0)
    loss  = weight_ce * CE + weight_dice * Dice

    gradient, with g_kv = m (A_k y_kv + B_k),  A_k = dloss/dI_k,  B_k = dloss/dP_k,
    f = weight_dice / K (K = number of averaged terms), c = 1 - a - b:
    A_k = -f (2 den_k - 2c n_k) / den_k^2,   B_k = f 2a n_k / den_k^2
          (clamped den_k < 1e-8: A_k = -2f / 1e-8, B_k = 0; A = B = 0 for the background
          when not do_bg)
    dloss/dx_kv = p_kv (g_kv - sum_j p_jv g_jv) + m w_{t_v} weight_ce (p_kv - y_kv) / sum_bv m w_{t_v}

Passes: pass 1 (forward) reads logits and labels and writes only per-program partial sums of
I, P, G and the CE sum; a one-program finalize kernel turns them into the loss and the
coefficients A, B, ce_scale; pass 2 (backward) reads logits and labels again and writes the
gradient times grad_output, rounded once to the logits' dtype. That is the traffic floor: two
reads of the logits and labels and one gradient write, and one rounding of the gradient (a
gradient stored in forward and scaled by a deep-supervision weight in backward is rounded
twice, and read and written once more). Backward may run more than once (retain_graph).

DDP (`ddp=True`, batch_dice): the sums are all-reduced between the passes; the maths of that
(the gradient's world_size factor) is in kernels/fused_dice_ce_torch.py.

Backends: CUDA tensors run the Triton kernels; CPU tensors run the same maths in torch
(kernels/fused_dice_ce_torch.py), or the Triton kernels through Triton's interpreter when
TRITON_INTERPRET=1 (how CI tests them). Where Triton does not import, CUDA tensors take the
torch path. Logits may be fp32, fp16 or bf16 (fp64 always takes the torch path, in fp64); sums
are accumulated in fp32 and the gradient is written in the logits' dtype.
"""
import torch
from torch import nn

from nnunet_heart_ext.kernels._triton import AVAILABLE as _TRITON_AVAILABLE
from nnunet_heart_ext.kernels._triton import INTERPRET as _TRITON_ON_CPU
from nnunet_heart_ext.kernels._triton import REASON as _TRITON_REASON
from nnunet_heart_ext.kernels._triton import tl, triton
from nnunet_heart_ext.kernels.fused_dice_ce_torch import ddp_active, forward_torch, loss_and_coefficients

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Launch configuration: elements (classes x voxels) a tile, warps a program, pass-1 programs per
# sample at most (each loops over its tiles, reducing each tile). benchmarks/bench_loss.py sweeps
# these on a GPU; on an H100 these defaults were the best of its sweep (2 x 4 x 160 x 320 x 256
# logits with deep supervision), and pass 1 took 0.26 ms for the five scales. Accumulating whole
# tiles in registers instead, reduced once at the end, took 0.94 ms (register spills).
LAUNCH = {"sums_tile_elements": 4096, "sums_num_warps": 4, "max_programs": 1024,
          "grad_tile_elements": 4096, "grad_num_warps": 4}


@triton.jit
def _load_tile(x_ptr, t_ptr, start, b, N, ignore_label, C: tl.constexpr, C_PAD: tl.constexpr,
               BLOCK: tl.constexpr, HAS_IGNORE: tl.constexpr):
    """Logits (C_PAD, BLOCK) as fp32, softmax, labels and the voxel mask of the tile at `start`."""
    voxels = start + tl.arange(0, BLOCK)
    classes = tl.arange(0, C_PAD)
    in_range = voxels < N
    labels = tl.load(t_ptr + b * N + voxels, mask=in_range, other=0).to(tl.int32)
    valid = in_range
    if HAS_IGNORE:
        valid = valid & (labels != ignore_label)
        labels = tl.where(valid, labels, 0)
    offsets = b * C * N + classes[:, None] * N + voxels[None, :]
    in_tile = (classes[:, None] < C) & in_range[None, :]
    x = tl.load(x_ptr + offsets, mask=in_tile, other=0.0).to(tl.float32)
    # padded classes get -inf so that they take no probability; padded voxels stay finite
    x = tl.where(classes[:, None] < C, x, float("-inf"))
    x_max = tl.max(x, axis=0)
    e = tl.exp(x - x_max[None, :])
    e_sum = tl.sum(e, axis=0)
    p = e / e_sum[None, :]
    is_label = classes[:, None] == labels[None, :]
    return x, p, is_label, valid, x_max + tl.log(e_sum), offsets, in_tile


@triton.jit
def _sums_kernel(x_ptr, t_ptr, w_ptr, partial_ptr, N, ignore_label, C: tl.constexpr, C_PAD: tl.constexpr,
                 BLOCK: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Pass 1: partial[b, q, k, program] = this program's I_k, P_k, G_k (q = 0, 1, 2) and CE sum
    (q = 3, k = 0) over the tiles pid, pid + programs, ... of sample b."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    classes = tl.arange(0, C_PAD)
    inter = tl.zeros((C_PAD,), tl.float32)
    pred = tl.zeros((C_PAD,), tl.float32)
    gt = tl.zeros((C_PAD,), tl.float32)
    ce = tl.zeros((C_PAD,), tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + classes, mask=classes < C, other=0.0)
    for start in range(pid * BLOCK, N, programs * BLOCK):
        x, p, is_label, valid, lse, offsets, in_tile = _load_tile(
            x_ptr, t_ptr, start, b, N, ignore_label, C, C_PAD, BLOCK, HAS_IGNORE)
        p = tl.where(valid[None, :], p, 0.0)
        inter += tl.sum(tl.where(is_label, p, 0.0), axis=1)
        pred += tl.sum(p, axis=1)
        gt += tl.sum(tl.where(is_label & valid[None, :], 1.0, 0.0), axis=1)
        x_label = tl.sum(tl.where(is_label, x, 0.0), axis=0)
        ce_v = lse - x_label
        if HAS_WEIGHT:
            ce_v = ce_v * tl.sum(tl.where(is_label, w[:, None], 0.0), axis=0)
        ce += tl.where(classes == 0, tl.sum(tl.where(valid, ce_v, 0.0), axis=0), 0.0)
    out = partial_ptr + b * 4 * C_PAD * programs + classes * programs + pid
    tl.store(out, inter)
    tl.store(out + C_PAD * programs, pred)
    tl.store(out + 2 * C_PAD * programs, gt)
    tl.store(out + 3 * C_PAD * programs, ce)


@triton.jit
def _finalize_kernel(partial_ptr, w_ptr, loss_ptr, coef_ptr, B, P, smooth, alpha, beta, weight_ce, weight_dice,
                     C: tl.constexpr, C_PAD: tl.constexpr, B_PAD: tl.constexpr, P_BLOCK: tl.constexpr,
                     BATCH_DICE: tl.constexpr, FIRST: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """One program: sums over the P partials, then loss_ptr[0] = loss and
    coef[b] = (A_k, B_k, (ce_scale, 0, ...)) as in the module docstring."""
    bs = tl.arange(0, B_PAD)
    classes = tl.arange(0, C_PAD)
    ps = tl.arange(0, P_BLOCK)
    inter = tl.zeros((B_PAD, C_PAD, P_BLOCK), tl.float32)
    pred = tl.zeros((B_PAD, C_PAD, P_BLOCK), tl.float32)
    gt = tl.zeros((B_PAD, C_PAD, P_BLOCK), tl.float32)
    ce = tl.zeros((B_PAD, C_PAD, P_BLOCK), tl.float32)
    base = partial_ptr + bs[:, None, None] * 4 * C_PAD * P + classes[None, :, None] * P + ps[None, None, :]
    for p0 in range(0, P, P_BLOCK):
        m = (bs[:, None, None] < B) & (p0 + ps[None, None, :] < P)
        inter += tl.load(base + p0, mask=m, other=0.0)
        pred += tl.load(base + p0 + C_PAD * P, mask=m, other=0.0)
        gt += tl.load(base + p0 + 2 * C_PAD * P, mask=m, other=0.0)
        ce += tl.load(base + p0 + 3 * C_PAD * P, mask=m, other=0.0)
    inter = tl.sum(inter, axis=2)
    pred = tl.sum(pred, axis=2)
    gt = tl.sum(gt, axis=2)
    ce = tl.sum(ce, axis=2)
    if HAS_WEIGHT:  # the CE's denominator: sum of the class weights of the valid voxels' labels
        w = tl.load(w_ptr + classes, mask=classes < C, other=0.0)
        n_valid = tl.sum(tl.sum(gt * w[None, :], axis=1), axis=0)
    else:
        n_valid = tl.sum(tl.sum(gt, axis=1), axis=0)  # each valid voxel has exactly one label
    ce_total = tl.sum(tl.sum(ce, axis=1), axis=0)
    term = (bs[:, None] < B) & (classes[None, :] < C) & (classes[None, :] >= FIRST)
    count = term
    if BATCH_DICE:  # sum over the batch; every row then holds the batch's value, counted once
        inter = tl.zeros((B_PAD, C_PAD), tl.float32) + tl.sum(inter, axis=0)[None, :]
        pred = tl.zeros((B_PAD, C_PAD), tl.float32) + tl.sum(pred, axis=0)[None, :]
        gt = tl.zeros((B_PAD, C_PAD), tl.float32) + tl.sum(gt, axis=0)[None, :]
        count = term & (bs[:, None] == 0)
    n_terms = tl.sum(tl.sum(count.to(tl.float32), axis=1), axis=0)
    numerator = 2 * inter + smooth
    den = 2 * inter + 2 * alpha * (pred - inter) + 2 * beta * (gt - inter) + smooth
    clamped = den < 1e-8
    den = tl.maximum(den, 1e-8)
    dice_mean = tl.sum(tl.sum(tl.where(count, numerator / den, 0.0), axis=1), axis=0) / n_terms
    has_valid = n_valid > 0
    ce_mean = tl.where(has_valid, ce_total / tl.maximum(n_valid, 1.0), 0.0)
    tl.store(loss_ptr, weight_ce * ce_mean - weight_dice * dice_mean)
    factor = weight_dice / n_terms
    coef_a = tl.where(clamped, -2 * factor / den,
                      -factor * (2 * den - 2 * (1 - alpha - beta) * numerator) / (den * den))
    coef_b = tl.where(clamped, 0.0, factor * 2 * alpha * numerator / (den * den))
    coef_a = tl.where(term, coef_a, 0.0)
    coef_b = tl.where(term, coef_b, 0.0)
    out = coef_ptr + bs[:, None] * 3 * C_PAD + classes[None, :]
    tl.store(out, coef_a, mask=bs[:, None] < B)
    tl.store(out + C_PAD, coef_b, mask=bs[:, None] < B)
    ce_scale = tl.where(has_valid, weight_ce / tl.maximum(n_valid, 1.0), 0.0)
    tl.store(out + 2 * C_PAD, tl.where(classes[None, :] == 0, ce_scale, 0.0), mask=bs[:, None] < B)


@triton.jit
def _grad_kernel(x_ptr, t_ptr, w_ptr, coef_ptr, grad_output_ptr, grad_ptr, N, ignore_label, C: tl.constexpr,
                 C_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 ROUND_BF16: tl.constexpr):
    """Pass 2: grad = grad_output * (p (g - sum_j p_j g_j) + ce_scale w_t (p - y)) on valid voxels,
    g = A_k y + B_k, with coef[b] = (A_k, B_k, (ce_scale, 0, ...))."""
    b = tl.program_id(1).to(tl.int64)
    x, p, is_label, valid, lse, offsets, in_tile = _load_tile(
        x_ptr, t_ptr, tl.program_id(0) * BLOCK, b, N, ignore_label, C, C_PAD, BLOCK, HAS_IGNORE)
    classes = tl.arange(0, C_PAD)
    coef = coef_ptr + b * 3 * C_PAD
    a = tl.load(coef + classes)
    bb = tl.load(coef + C_PAD + classes)
    ce_scale = tl.load(coef + 2 * C_PAD)
    scale = tl.load(grad_output_ptr).to(tl.float32)
    g = tl.where(is_label, a[:, None], 0.0) + bb[:, None]
    pg = tl.sum(p * g, axis=0)
    ce_grad = p - tl.where(is_label, 1.0, 0.0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + classes, mask=classes < C, other=0.0)
        ce_grad = ce_grad * tl.sum(tl.where(is_label, w[:, None], 0.0), axis=0)[None, :]
    grad = p * (g - pg[None, :]) + ce_scale * ce_grad
    grad = tl.where(valid[None, :], grad * scale, 0.0)
    if ROUND_BF16:
        # round to nearest even by hand: Triton's interpreter truncates fp32 -> bf16 casts
        bits = grad.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        grad = bits.to(tl.float32, bitcast=True)
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_tile)


def _block(c_pad: int, tile_elements: int) -> int:
    return max(128, tile_elements // c_pad)


def _weights_tuple(weight) -> tuple:
    """Class weights given as a tensor or a sequence, as a tuple of floats (hashable, no device)."""
    return tuple(float(w) for w in (weight.tolist() if torch.is_tensor(weight) else weight))


def _weight_tensor(options, device):
    """The CE class weights as a (C,) fp32 tensor for the kernels, or a placeholder when there are none."""
    if options["ce_weight"] is None:
        return torch.empty(1, device=device, dtype=torch.float32)
    return torch.tensor(options["ce_weight"], device=device, dtype=torch.float32)


def _forward_triton(x, labels, ignore_label, options):
    """Pass 1 and the finalize kernel: (loss, coef, w) with coef (B, 3, C_PAD) fp32 and w the class
    weights on the device (kept for pass 2, so they are copied to the device once a call)."""
    B, C, N = x.shape
    w = _weight_tensor(options, x.device)
    has_weight = options["ce_weight"] is not None
    c_pad = triton.next_power_of_2(C)
    block = _block(c_pad, LAUNCH["sums_tile_elements"])
    programs = max(1, min(triton.cdiv(N, block), LAUNCH["max_programs"]))
    ignore = 0 if ignore_label is None else int(ignore_label)
    partial = torch.empty((B, 4, c_pad, programs), device=x.device, dtype=torch.float32)
    _sums_kernel[(programs, B)](x, labels, w, partial, N, ignore, C=C, C_PAD=c_pad, BLOCK=block,
                                HAS_IGNORE=ignore_label is not None, HAS_WEIGHT=has_weight,
                                num_warps=LAUNCH["sums_num_warps"])
    if options["batch_dice"] and options["ddp"] and ddp_active():
        # the all-reduce sits between the passes: the finalize maths in torch (rare: multi-GPU)
        sums = partial.sum(3)
        loss, a, b, ce_scale = loss_and_coefficients(sums[:, :3, :C], sums[:, 3, 0], **options)
        coef = torch.zeros((B, 3, c_pad), device=x.device, dtype=torch.float32)
        coef[:, 0, :C], coef[:, 1, :C], coef[:, 2, 0] = a, b, ce_scale
        return loss, coef, w
    loss = torch.empty((), device=x.device, dtype=torch.float32)
    coef = torch.empty((B, 3, c_pad), device=x.device, dtype=torch.float32)  # every entry is written
    b_pad = triton.next_power_of_2(B)
    p_block = max(1, min(triton.next_power_of_2(programs), 2048 // (b_pad * c_pad)))
    _finalize_kernel[(1,)](partial, w, loss, coef, B, programs, options["smooth"], options["alpha"], options["beta"],
                           options["weight_ce"], options["weight_dice"], C=C, C_PAD=c_pad, B_PAD=b_pad,
                           P_BLOCK=p_block, BATCH_DICE=options["batch_dice"], FIRST=0 if options["do_bg"] else 1,
                           HAS_WEIGHT=has_weight)
    return loss, coef, w


def _grad_triton(x, labels, ignore_label, coef, w, grad_output, has_weight):
    B, C, N = x.shape
    c_pad = triton.next_power_of_2(C)
    block = _block(c_pad, LAUNCH["grad_tile_elements"])
    grad = torch.empty_like(x)
    _grad_kernel[(triton.cdiv(N, block), B)](
        x, labels, w, coef, grad_output.to(torch.float32).reshape(1), grad, N,
        0 if ignore_label is None else int(ignore_label), C=C, C_PAD=c_pad, BLOCK=block,
        HAS_IGNORE=ignore_label is not None, HAS_WEIGHT=has_weight,
        ROUND_BF16=x.dtype == torch.bfloat16,
        num_warps=LAUNCH["grad_num_warps"])
    return grad


class _FusedDiceCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, use_triton, ignore_label, needs_grad, options):
        B, C = logits.shape[:2]
        x = logits.reshape(B, C, -1).contiguous()
        labels = labels.reshape(B, -1).contiguous()
        ctx.use_triton, ctx.ignore_label, ctx.shape = use_triton, ignore_label, logits.shape
        ctx.has_weight = options["ce_weight"] is not None
        ctx.logits_dtype = logits.dtype
        with torch.autocast(logits.device.type, enabled=False):  # the maths picks its own precision
            if use_triton:
                loss, coef, w = _forward_triton(x, labels, ignore_label, options)
                if needs_grad:
                    ctx.save_for_backward(x, labels, coef, w)
            else:
                loss, grad = forward_torch(x, labels, ignore_label, needs_grad, options)
                if needs_grad:
                    ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.use_triton:
            x, labels, coef, w = ctx.saved_tensors
            grad = _grad_triton(x, labels, ctx.ignore_label, coef, w, grad_output, ctx.has_weight)
        else:
            grad, = ctx.saved_tensors
            grad = (grad * grad_output).to(ctx.logits_dtype)  # one rounding
        return grad.view(ctx.shape), None, None, None, None, None


def _check_and_pick_backend(logits, target, do_bg, backend):
    """(target as (B, 1, *spatial), use_triton) after checking shapes, devices and the backend."""
    if logits.ndim not in (4, 5):
        raise ValueError(f"fused_dice_ce: logits must be (B, C, H, W) or (B, C, D, H, W), got {tuple(logits.shape)}")
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(f"fused_dice_ce: target must be (B, 1, *spatial) = "
                         f"{(logits.shape[0], 1, *logits.shape[2:])}, got {tuple(target.shape)}")
    if logits.shape[1] < (1 if do_bg else 2):
        raise ValueError(f"fused_dice_ce: {logits.shape[1]} class(es) leave no Dice term (do_bg={do_bg})")
    if target.device != logits.device:
        raise ValueError(f"fused_dice_ce: logits on {logits.device} but target on {target.device}")
    triton_can = logits.dtype in _TRITON_DTYPES and (logits.is_cuda or _TRITON_ON_CPU)
    if backend == "auto":
        return target, triton_can and _TRITON_AVAILABLE
    if backend == "torch":
        return target, False
    if backend == "triton":
        if not _TRITON_AVAILABLE:
            raise ValueError(f"fused_dice_ce: the Triton backend is unavailable: {_TRITON_REASON}")
        if not triton_can:
            raise ValueError(f"fused_dice_ce: the Triton backend needs fp32/fp16/bf16 logits on CUDA "
                             f"(or TRITON_INTERPRET=1), got {logits.dtype} on {logits.device}")
        return target, True
    raise ValueError(f"fused_dice_ce: backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def fused_dice_ce(logits: torch.Tensor, target: torch.Tensor, *, batch_dice: bool, do_bg: bool = False,
                  smooth: float = 1e-5, weight_ce: float = 1.0, weight_dice: float = 1.0,
                  ignore_label: int = None, ddp: bool = False, alpha: float = 0.5, beta: float = 0.5,
                  ce_weight=None, backend: str = "auto") -> torch.Tensor:
    """nnU-Net's Dice + CE loss of `logits` (B, C, *spatial) against integer labels `target`
    (B, 1, *spatial) or (B, *spatial), any real or integer dtype. Returns a 0-d fp32 tensor
    (fp64 for fp64 logits). `alpha`, `beta`: Tversky's weights of false positives and false
    negatives (0.5, 0.5: Dice). `ce_weight`: the cross-entropy's class weights (C values >= 0,
    as torch's CrossEntropyLoss(weight=...): a weighted mean over the voxels), None for none.
    `backend`: "auto" (Triton on CUDA, and on CPU when TRITON_INTERPRET=1; torch otherwise and
    where Triton does not import), "triton" or "torch"."""
    target, use_triton = _check_and_pick_backend(logits, target, do_bg, backend)
    if not (alpha >= 0 and beta >= 0 and alpha + beta > 0):
        raise ValueError(f"fused_dice_ce: alpha and beta must be >= 0 and not both 0, got {alpha}, {beta}")
    if ce_weight is not None:
        ce_weight = _weights_tuple(ce_weight)
        if len(ce_weight) != logits.shape[1] or not all(w >= 0 for w in ce_weight):
            raise ValueError(f"fused_dice_ce: ce_weight must hold {logits.shape[1]} values >= 0 (one per class), "
                             f"got {ce_weight}")
    options = dict(batch_dice=batch_dice, do_bg=do_bg, smooth=float(smooth), alpha=float(alpha), beta=float(beta),
                   weight_ce=float(weight_ce), weight_dice=float(weight_dice), ddp=ddp, ce_weight=ce_weight)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    return _FusedDiceCEFunction.apply(logits, target, use_triton, ignore_label, needs_grad, options)


class FusedDiceCELoss(nn.Module):
    """Drop-in for nnU-Net's `DC_and_CE_loss(soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice,
    ignore_label, dice_class=MemoryEfficientSoftDiceLoss)`: same arguments, value and gradient.
    `soft_dice_kwargs` takes batch_dice, do_bg, smooth, ddp (nnU-Net's defaults: do_bg=True,
    smooth=1.0, ddp=True); `ce_kwargs` may hold CrossEntropyLoss's class `weight` (no smoothing).
    `alpha`, `beta` (keyword only) make the Dice term Tversky's (false positives weighted by alpha,
    false negatives by beta; 0.5 and 0.5 are the Dice of nnU-Net, smoothing included)."""

    def __init__(self, soft_dice_kwargs: dict, ce_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                 ignore_label: int = None, *, alpha: float = 0.5, beta: float = 0.5):
        super().__init__()
        unknown = set(soft_dice_kwargs) - {"batch_dice", "do_bg", "smooth", "ddp"}
        if unknown:
            raise ValueError(f"FusedDiceCELoss: unsupported soft_dice_kwargs {sorted(unknown)}")
        unsupported = {k: v for k, v in ce_kwargs.items()
                       if not (k == "ignore_index" and v in (ignore_label, -100))
                       and not (k == "reduction" and v == "mean")
                       and k != "weight" and not (k == "label_smoothing" and v == 0)}
        if unsupported:
            raise ValueError(f"FusedDiceCELoss: unsupported ce_kwargs {unsupported}")
        self.batch_dice = soft_dice_kwargs.get("batch_dice", False)
        self.do_bg = soft_dice_kwargs.get("do_bg", True)
        self.smooth = soft_dice_kwargs.get("smooth", 1.0)
        self.ddp = soft_dice_kwargs.get("ddp", True)
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.ignore_label = ignore_label
        self.alpha = alpha
        self.beta = beta
        weight = ce_kwargs.get("weight")
        self.ce_weight = None if weight is None else _weights_tuple(weight)

    @classmethod
    def from_nnunet(cls, loss) -> "FusedDiceCELoss":
        """The fused equivalent of an nnU-Net `DC_and_CE_loss` built with
        MemoryEfficientSoftDiceLoss (its Dice part may be torch.compile'd)."""
        dc = getattr(loss.dc, "_orig_mod", loss.dc)
        ce = loss.ce
        if type(dc).__name__ != "MemoryEfficientSoftDiceLoss" or ce.label_smoothing:
            raise ValueError(f"FusedDiceCELoss.from_nnunet: only MemoryEfficientSoftDiceLoss with a "
                             f"cross-entropy without label smoothing is fused, got {type(dc).__name__} and {ce}")
        return cls({"batch_dice": dc.batch_dice, "do_bg": dc.do_bg, "smooth": dc.smooth, "ddp": dc.ddp},
                   {} if ce.weight is None else {"weight": ce.weight},
                   weight_ce=loss.weight_ce, weight_dice=loss.weight_dice, ignore_label=loss.ignore_label)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_dice_ce(net_output, target, batch_dice=self.batch_dice, do_bg=self.do_bg, smooth=self.smooth,
                             weight_ce=self.weight_ce, weight_dice=self.weight_dice,
                             ignore_label=self.ignore_label, ddp=self.ddp, alpha=self.alpha, beta=self.beta,
                             ce_weight=self.ce_weight)

    def extra_repr(self) -> str:
        return (f"batch_dice={self.batch_dice}, do_bg={self.do_bg}, smooth={self.smooth}, ddp={self.ddp}, "
                f"weight_ce={self.weight_ce}, weight_dice={self.weight_dice}, ignore_label={self.ignore_label}, "
                f"alpha={self.alpha}, beta={self.beta}, ce_weight={self.ce_weight}")
