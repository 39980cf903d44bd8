"""Fused softmax + soft Dice + cross-entropy loss: nnU-Net's default loss in two passes.

Same value and gradient as nnU-Net's
`DC_and_CE_loss(soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice, ignore_label,
dice_class=MemoryEfficientSoftDiceLoss)` for logits `x` of shape (B, C, *spatial) and integer
labels `t` of shape (B, 1, *spatial) (float or integer dtype, as nnU-Net gives them). No one-hot
tensor is ever made; the Triton path stores no probabilities either (the torch path keeps them
between its two passes).

Reference maths (v: voxel, k: class, m_v = [t_v != ignore_label], labels at ignored voxels
count as 0, y_kv = [t_v == k], s = smooth):

    p_kv  = softmax(x)_kv over k
    I_bk  = sum_v m p_kv y_kv      P_bk = sum_v m p_kv      G_bk = sum_v m y_kv
    batch_dice: I, P, G summed over b (and over DDP ranks when ddp=True)
    dc_k  = (2 I_k + s) / max(G_k + P_k + s, 1e-8)
    Dice  = -mean(dc) over k (and b when not batch_dice); k >= 1 unless do_bg
    CE    = sum_bv m (logsumexp_k x_kv - x_{t_v,v}) / sum_bv m     (0 when every voxel is ignored)
    loss  = weight_ce * CE + weight_dice * Dice

    gradient, with g_kv = m (A_k y_kv + B_k),  A_k = dloss/dI_k,  B_k = dloss/dP_k:
    A_k = -weight_dice * 2 / (K den_k),   B_k = weight_dice * (2 I_k + s) / (K den_k^2)
          (den_k = clamped denominator, K = number of averaged Dice terms, A = B = 0 for the
          background when not do_bg; B = 0 where the clamp is active)
    dloss/dx_kv = p_kv (g_kv - sum_j p_jv g_jv) + m weight_ce (p_kv - y_kv) / sum_v m

Passes (Liger-Kernel's "gradient in forward" trick): pass 1 reads logits and labels and writes
only per-block partial sums of I, P, G and the CE sum; the coefficients A, B come from those
sums; pass 2 reads logits and labels again and writes the gradient. Backward only scales the
stored gradient by grad_output. fp16 gradients are stored times a power of two `S` chosen from
a bound on their size (a CE gradient of 1 / (B D H W) would be below fp16's normal range), and
backward multiplies by grad_output / S.

DDP (`ddp=True`, batch_dice, an initialised process group): the (C,) sums are all-reduced, and the
Dice gradient carries the factor world_size that nnU-Net's AllGatherGrad gives it (each rank's
identical loss sends its gradient to every rank); DDP's gradient averaging then divides it out.
This assumes the same grad_output on every rank, which holds for nnU-Net's training step.

Backends: CUDA tensors run the Triton kernels; CPU tensors run the same maths in torch, or the
Triton kernels through Triton's interpreter when TRITON_INTERPRET=1 (how CI tests them). Logits
may be fp32, fp16 or bf16 (fp64 always takes the torch path, in fp64); sums are accumulated in
fp32 and the gradient is written in the logits' dtype.
"""
import os

import torch
import triton
import triton.language as tl
from torch import nn

# TRITON_INTERPRET is read by triton.jit when this module is imported, so it is read here too.
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP16_GRAD_TARGET = 2.0 ** 14  # largest stored |gradient| after scaling: headroom below 65504


@triton.jit
def _load_block(x_ptr, t_ptr, N, ignore_label, C: tl.constexpr, C_PAD: tl.constexpr,
                BLOCK: tl.constexpr, HAS_IGNORE: tl.constexpr):
    """Logits (C_PAD, BLOCK) as fp32, softmax, labels and the voxel mask of one tile."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    voxels = pid * BLOCK + tl.arange(0, BLOCK)
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
    return x, p, is_label, valid, x_max + tl.log(e_sum), offsets, in_tile, classes, b, pid


@triton.jit
def _dice_ce_sums_kernel(x_ptr, t_ptr, partial_ptr, N, ignore_label, C: tl.constexpr,
                         C_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_IGNORE: tl.constexpr):
    """Pass 1: partial[b, block] = (I_k, P_k, G_k, CE sum) over this tile's voxels."""
    x, p, is_label, valid, lse, offsets, in_tile, classes, b, pid = _load_block(
        x_ptr, t_ptr, N, ignore_label, C, C_PAD, BLOCK, HAS_IGNORE)
    p = tl.where(valid[None, :], p, 0.0)
    inter = tl.sum(tl.where(is_label, p, 0.0), axis=1)
    pred = tl.sum(p, axis=1)
    gt = tl.sum(tl.where(is_label & valid[None, :], 1.0, 0.0), axis=1)
    x_label = tl.sum(tl.where(is_label, x, 0.0), axis=0)
    ce = tl.sum(tl.where(valid, lse - x_label, 0.0), axis=0)
    out = partial_ptr + (b * tl.num_programs(0) + pid) * 4 * C_PAD + classes
    tl.store(out, inter)
    tl.store(out + C_PAD, pred)
    tl.store(out + 2 * C_PAD, gt)
    tl.store(out + 3 * C_PAD, tl.where(classes == 0, ce, 0.0))


@triton.jit
def _dice_ce_grad_kernel(x_ptr, t_ptr, coef_ptr, grad_ptr, N, ignore_label, C: tl.constexpr,
                         C_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_IGNORE: tl.constexpr,
                         ROUND_BF16: tl.constexpr):
    """Pass 2: grad = S * (p (g - sum_j p_j g_j) + ce_scale (p - y)) on valid voxels, where
    coef[b] = (A_k, B_k, (ce_scale, S, 0...))."""
    x, p, is_label, valid, lse, offsets, in_tile, classes, b, pid = _load_block(
        x_ptr, t_ptr, N, ignore_label, C, C_PAD, BLOCK, HAS_IGNORE)
    coef = coef_ptr + b * 3 * C_PAD
    a = tl.load(coef + classes)
    bb = tl.load(coef + C_PAD + classes)
    ce_scale = tl.load(coef + 2 * C_PAD)
    scale = tl.load(coef + 2 * C_PAD + 1)
    g = tl.where(is_label, a[:, None], 0.0) + bb[:, None]
    pg = tl.sum(p * g, axis=0)
    grad = p * (g - pg[None, :]) + ce_scale * (p - tl.where(is_label, 1.0, 0.0))
    grad = tl.where(valid[None, :], grad * scale, 0.0)
    if ROUND_BF16:
        # round to nearest even by hand: Triton's interpreter truncates fp32 -> bf16 casts
        bits = grad.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        grad = bits.to(tl.float32, bitcast=True)
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_tile)


def _launch_config(C: int, N: int):
    c_pad = triton.next_power_of_2(C)
    block = max(128, 4096 // c_pad)  # about 4096 elements a tile
    return c_pad, block, triton.cdiv(N, block)


def _sums_triton(x, labels, ignore_label):
    """(B, 3, C) fp32 sums I, P, G and the (B,) CE sums, by pass 1."""
    B, C, N = x.shape
    c_pad, block, n_blocks = _launch_config(C, N)
    partial = torch.empty((B, n_blocks, 4, c_pad), device=x.device, dtype=torch.float32)
    _dice_ce_sums_kernel[(n_blocks, B)](
        x, labels, partial, N, 0 if ignore_label is None else int(ignore_label), C=C, C_PAD=c_pad,
        BLOCK=block, HAS_IGNORE=ignore_label is not None)
    sums = partial.sum(1)
    return sums[:, :3, :C], sums[:, 3, 0]


def _grad_triton(x, labels, ignore_label, a, b, ce_scale, scale):
    B, C, N = x.shape
    c_pad, block, n_blocks = _launch_config(C, N)
    coef = torch.zeros((B, 3, c_pad), device=x.device, dtype=torch.float32)
    coef[:, 0, :C] = a
    coef[:, 1, :C] = b
    coef[:, 2, 0] = ce_scale
    coef[:, 2, 1] = scale
    grad = torch.empty_like(x)
    _dice_ce_grad_kernel[(n_blocks, B)](
        x, labels, coef, grad, N, 0 if ignore_label is None else int(ignore_label), C=C, C_PAD=c_pad,
        BLOCK=block, HAS_IGNORE=ignore_label is not None, ROUND_BF16=x.dtype == torch.bfloat16)
    return grad


def _forward_torch(x, labels, ignore_label, needs_grad, options):
    """The same two passes in torch (the CPU path); the probabilities are kept between them and
    class sums over voxels are batched matrix products."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C, N = x.shape
    labels = labels.long().unsqueeze(1)  # (B, 1, N)
    mask = None
    if ignore_label is not None:
        valid = labels != ignore_label
        labels = labels.masked_fill(~valid, 0)
        mask = valid.to(compute)
    log_p = torch.log_softmax(x.to(compute), 1)
    log_p_label = log_p.gather(1, labels)  # (B, 1, N)
    p = log_p.exp_()
    p_label = log_p_label.exp()
    weight = torch.ones_like(p_label) if mask is None else mask
    inter = torch.zeros((B, C), dtype=compute, device=x.device).scatter_add_(1, labels[:, 0], (p_label * weight)[:, 0])
    pred = torch.bmm(p, weight.transpose(1, 2))[..., 0]
    gt = torch.zeros((B, C), dtype=compute, device=x.device).scatter_add_(1, labels[:, 0], weight[:, 0])
    ce_sum = -(log_p_label * weight).sum((1, 2))
    loss, a, b, ce_scale, scale = _loss_and_coefficients(
        torch.stack((inter, pred, gt), 1), ce_sum, x.dtype, **options)
    if not needs_grad:
        return loss, None, scale
    # S dloss/dx = p (S (B_k + ce_scale) - S sum_j p_j g_j) + [k == t] S (p_t A_t - ce_scale), times m
    a_label = a.to(compute).gather(1, labels[:, 0]).unsqueeze(1)
    b = b.to(compute).unsqueeze(1)  # (B, 1, C)
    pg = torch.bmm(b, p).add_(p_label * a_label).mul_(scale)  # S sum_j p_j g_j, (B, 1, N)
    grad = p * ((b.transpose(1, 2) + ce_scale) * scale)
    grad.addcmul_(p, pg, value=-1.0)
    del p
    grad.scatter_add_(1, labels, (p_label * a_label - ce_scale).mul_(scale))
    if mask is not None:
        grad.mul_(mask)
    return loss, grad.to(x.dtype), scale


def _forward_triton(x, labels, ignore_label, needs_grad, options):
    sums, ce_sum = _sums_triton(x, labels, ignore_label)
    loss, a, b, ce_scale, scale = _loss_and_coefficients(sums, ce_sum, x.dtype, **options)
    grad = _grad_triton(x, labels, ignore_label, a, b, ce_scale, scale) if needs_grad else None
    return loss, grad, scale


def _loss_and_coefficients(sums, ce_sum, logits_dtype, *, batch_dice, do_bg, smooth, weight_ce,
                           weight_dice, ddp):
    """Loss value, gradient coefficients A, B (B, C), CE scale and storage scale S, from the
    (B, 3, C) sums I, P, G and the (B,) CE sums (see the module docstring)."""
    n_valid = sums[:, 2].sum()  # each valid voxel has exactly one label
    world = 1
    if batch_dice:
        sums = sums.sum(0)
        if ddp and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            world = torch.distributed.get_world_size()
    inter, pred, gt = sums.unbind(-2)
    first = 0 if do_bg else 1
    den = gt + pred + smooth
    den_clamped = den.clamp_min(1e-8)
    dc = (2 * inter + smooth) / den_clamped
    terms = dc[..., first:].numel()
    ce = torch.where(n_valid > 0, ce_sum.sum() / n_valid.clamp_min(1), 0.0)
    loss = weight_ce * ce - weight_dice * dc[..., first:].mean()

    factor = weight_dice * world / terms
    a = -2 * factor / den_clamped
    b = torch.where(den >= 1e-8, factor * (2 * inter + smooth) / den_clamped ** 2, 0.0)
    a[..., :first] = 0
    b[..., :first] = 0
    a, b = (v.expand(ce_sum.shape[0], -1) for v in (a, b))
    ce_scale = torch.where(n_valid > 0, weight_ce / n_valid.clamp_min(1), 0.0)
    if logits_dtype == torch.float16:
        # |grad| <= 2 max(|A| + |B|) + ce_scale; store it times a power of two below 2^14
        bound = 2 * (a.abs() + b.abs()).amax() + ce_scale.abs()
        scale = torch.exp2(torch.floor(torch.log2(_FP16_GRAD_TARGET / bound.clamp_min(1e-30))))
    else:
        scale = torch.ones((), dtype=sums.dtype, device=sums.device)
    return loss, a, b, ce_scale, scale


class _FusedDiceCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, use_triton, ignore_label, needs_grad, options):
        B, C = logits.shape[:2]
        x = logits.reshape(B, C, -1).contiguous()
        labels = labels.reshape(B, -1).contiguous()
        run = _forward_triton if use_triton else _forward_torch
        with torch.autocast(logits.device.type, enabled=False):  # the maths picks its own precision
            loss, grad, scale = run(x, labels, ignore_label, needs_grad, options)
        if grad is not None:
            ctx.save_for_backward(grad.view(logits.shape), scale)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("fused_dice_ce: the gradient is scaled in place, so backward can run "
                               "only once per forward (no retain_graph)")
        ctx.used = True
        grad, scale = ctx.saved_tensors
        return grad.mul_(grad_output / scale), None, None, None, None, None


def fused_dice_ce(logits: torch.Tensor, target: torch.Tensor, *, batch_dice: bool, do_bg: bool = False,
                  smooth: float = 1e-5, weight_ce: float = 1.0, weight_dice: float = 1.0,
                  ignore_label: int = None, ddp: bool = False, backend: str = "auto") -> torch.Tensor:
    """nnU-Net's Dice + CE loss of `logits` (B, C, *spatial) against integer labels `target`
    (B, 1, *spatial) or (B, *spatial), any real or integer dtype. Returns a 0-d fp32 tensor
    (fp64 for fp64 logits). `backend`: "auto" (Triton on CUDA, and on CPU when TRITON_INTERPRET=1;
    torch otherwise), "triton" or "torch"."""
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
    if backend == "auto":
        use_triton = logits.dtype in _TRITON_DTYPES and (logits.is_cuda or _TRITON_ON_CPU)
    elif backend in ("triton", "torch"):
        use_triton = backend == "triton"
        if use_triton and (logits.dtype not in _TRITON_DTYPES or not (logits.is_cuda or _TRITON_ON_CPU)):
            raise ValueError(f"fused_dice_ce: the Triton backend needs fp32/fp16/bf16 logits on CUDA "
                             f"(or TRITON_INTERPRET=1), got {logits.dtype} on {logits.device}")
    else:
        raise ValueError(f"fused_dice_ce: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    options = dict(batch_dice=batch_dice, do_bg=do_bg, smooth=float(smooth), weight_ce=float(weight_ce),
                   weight_dice=float(weight_dice), ddp=ddp)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    return _FusedDiceCEFunction.apply(logits, target, use_triton, ignore_label, needs_grad, options)


class FusedDiceCELoss(nn.Module):
    """Drop-in for nnU-Net's `DC_and_CE_loss(soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice,
    ignore_label, dice_class=MemoryEfficientSoftDiceLoss)`: same arguments, value and gradient.
    `soft_dice_kwargs` takes batch_dice, do_bg, smooth, ddp (nnU-Net's defaults: do_bg=True,
    smooth=1.0, ddp=True); `ce_kwargs` must be plain CrossEntropyLoss (no weight, no smoothing)."""

    def __init__(self, soft_dice_kwargs: dict, ce_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                 ignore_label: int = None):
        super().__init__()
        unknown = set(soft_dice_kwargs) - {"batch_dice", "do_bg", "smooth", "ddp"}
        if unknown:
            raise ValueError(f"FusedDiceCELoss: unsupported soft_dice_kwargs {sorted(unknown)}")
        unsupported = {k: v for k, v in ce_kwargs.items()
                       if not (k == "ignore_index" and v in (ignore_label, -100))
                       and not (k == "reduction" and v == "mean")
                       and not (k == "weight" and v is None) and not (k == "label_smoothing" and v == 0)}
        if unsupported:
            raise ValueError(f"FusedDiceCELoss: unsupported ce_kwargs {unsupported}")
        self.batch_dice = soft_dice_kwargs.get("batch_dice", False)
        self.do_bg = soft_dice_kwargs.get("do_bg", True)
        self.smooth = soft_dice_kwargs.get("smooth", 1.0)
        self.ddp = soft_dice_kwargs.get("ddp", True)
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.ignore_label = ignore_label

    @classmethod
    def from_nnunet(cls, loss) -> "FusedDiceCELoss":
        """The fused equivalent of an nnU-Net `DC_and_CE_loss` built with
        MemoryEfficientSoftDiceLoss (its Dice part may be torch.compile'd)."""
        dc = getattr(loss.dc, "_orig_mod", loss.dc)
        ce = loss.ce
        if type(dc).__name__ != "MemoryEfficientSoftDiceLoss" or ce.weight is not None or ce.label_smoothing:
            raise ValueError(f"FusedDiceCELoss.from_nnunet: only MemoryEfficientSoftDiceLoss with a plain "
                             f"cross-entropy is fused, got {type(dc).__name__} and {ce}")
        return cls({"batch_dice": dc.batch_dice, "do_bg": dc.do_bg, "smooth": dc.smooth, "ddp": dc.ddp}, {},
                   weight_ce=loss.weight_ce, weight_dice=loss.weight_dice, ignore_label=loss.ignore_label)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_dice_ce(net_output, target, batch_dice=self.batch_dice, do_bg=self.do_bg, smooth=self.smooth,
                             weight_ce=self.weight_ce, weight_dice=self.weight_dice,
                             ignore_label=self.ignore_label, ddp=self.ddp)

    def extra_repr(self) -> str:
        return (f"batch_dice={self.batch_dice}, do_bg={self.do_bg}, smooth={self.smooth}, ddp={self.ddp}, "
                f"weight_ce={self.weight_ce}, weight_dice={self.weight_dice}, ignore_label={self.ignore_label}")
