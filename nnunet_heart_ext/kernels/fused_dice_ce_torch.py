"""The torch path of `fused_dice_ce` (kernels/fused_dice_ce.py, whose docstring states the maths):
CPU tensors (unless TRITON_INTERPRET=1), fp64 logits, and CUDA tensors where Triton does not
import. `forward_torch` computes the loss and, in the forward, the gradient per unit
grad_output; `loss_and_coefficients` turns the class sums into the loss and the gradient's
coefficients A, B and the CE scale, for this path and for the Triton path under DDP (where the
all-reduce sits between its two passes).

DDP (`ddp=True`, batch_dice, an initialised process group): the (C,) sums are all-reduced, and the
Dice gradient carries the factor world_size that nnU-Net's AllGatherGrad gives it (each rank's
identical loss sends its gradient to every rank); DDP's gradient averaging then divides it out.
This assumes the same grad_output on every rank, which holds for nnU-Net's training step.
"""
import torch

_CLAMP = 1e-8  # nnU-Net's clamp_min of the Dice denominator


def forward_torch(x, labels, ignore_label, needs_grad, options):
    """The same maths in torch (the CPU path): (loss, gradient per unit grad_output in the
    compute dtype, or None). Class sums over voxels are batched matrix products."""
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
    ce_weight = weight  # m w_t: the CE's weight of each voxel
    if options["ce_weight"] is not None:
        w_label = torch.tensor(options["ce_weight"], dtype=compute, device=x.device)[labels]  # (B, 1, N)
        ce_weight = weight * w_label
    ce_sum = -(log_p_label * ce_weight).sum((1, 2))
    loss, a, b, ce_scale = loss_and_coefficients(torch.stack((inter, pred, gt), 1), ce_sum, **options)
    if not needs_grad:
        return loss, None
    # dloss/dx = p (B_k + ce_scale w_t - sum_j p_j g_j) + [k == t] (p_t A_t - ce_scale w_t), times m
    a_label = a.to(compute).gather(1, labels[:, 0]).unsqueeze(1)
    b = b.to(compute).unsqueeze(1)  # (B, 1, C)
    pg = torch.bmm(b, p).add_(p_label * a_label)  # sum_j p_j g_j, (B, 1, N)
    ce_v = ce_scale if options["ce_weight"] is None else ce_scale * w_label  # (B, 1, N) when weighted
    grad = p * (b.transpose(1, 2) + ce_v)
    grad.addcmul_(p, pg, value=-1.0)
    del p
    grad.scatter_add_(1, labels, p_label * a_label - ce_v)
    if mask is not None:
        grad.mul_(mask)
    return loss, grad


def ddp_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def loss_and_coefficients(sums, ce_sum, *, batch_dice, do_bg, smooth, alpha, beta, weight_ce, weight_dice, ddp,
                          ce_weight):
    """Loss value, gradient coefficients A, B (B, C) and the CE scale, from the (B, 3, C) sums
    I, P, G and the (B,) CE sums (maths: kernels/fused_dice_ce.py's docstring). The torch path's maths, and the
    Triton path's under DDP (the finalize kernel's otherwise)."""
    if ce_weight is None:
        n_valid = sums[:, 2].sum()  # each valid voxel has exactly one label
    else:  # the sum of the class weights of the valid voxels' labels
        n_valid = (sums[:, 2] * torch.tensor(ce_weight, dtype=sums.dtype, device=sums.device)).sum()
    world = 1
    if batch_dice:
        sums = sums.sum(0)
        if ddp and ddp_active():
            torch.distributed.all_reduce(sums)
            world = torch.distributed.get_world_size()
    inter, pred, gt = sums.unbind(-2)
    first = 0 if do_bg else 1
    numerator = 2 * inter + smooth
    den = 2 * inter + 2 * alpha * (pred - inter) + 2 * beta * (gt - inter) + smooth
    den_clamped = den.clamp_min(_CLAMP)
    tversky = numerator / den_clamped
    terms = tversky[..., first:].numel()
    ce = torch.where(n_valid > 0, ce_sum.sum() / n_valid.clamp_min(1), 0.0)
    loss = weight_ce * ce - weight_dice * tversky[..., first:].mean()

    factor = weight_dice * world / terms
    clamped = den < _CLAMP
    a = torch.where(clamped, -2 * factor / den_clamped,
                    -factor * (2 * den_clamped - 2 * (1 - alpha - beta) * numerator) / den_clamped ** 2)
    b = torch.where(clamped, 0.0, factor * 2 * alpha * numerator / den_clamped ** 2)
    a[..., :first] = 0
    b[..., :first] = 0
    a, b = (v.expand(ce_sum.shape[0], -1) for v in (a, b))
    ce_scale = torch.where(n_valid > 0, weight_ce / n_valid.clamp_min(1), 0.0)
    return loss, a, b, ce_scale
