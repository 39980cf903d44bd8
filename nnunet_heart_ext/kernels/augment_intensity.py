"""The intensity transforms of nnU-Net's default 3D training augmentation, batched, on the
tensors' device: Gaussian noise, Gaussian blur, brightness, contrast, low resolution, gamma
(inverted, then plain), in that order (batchgeneratorsv2 0.3.6, as nnunetv2 2.8.1 composes them).

kernels/augment.py draws every parameter (`DeviceAugmentation.sample_parameters`: which
transform fires for which sample and channel, and its values) and runs the spatial transform,
then `apply_intensity` on the patches, then the mirroring. Maths of each step on a sample x
(C, *P), with its drawn values (std, sigma, m, s, g):
    noise: x += N(0, std^2);  blur: separable Gaussian, kernel size the odd number nearest to
        6 sigma + 0.5, reflect padding;  brightness: x *= m;
    contrast: x = clamp((x - mean) m + mean, min, max) over the channel;
    low resolution: nearest-exact to round(P s), trilinear back;
    gamma: [invert: x = -x] mu, sd = mean, std(x); r = max - min;
        x = ((x - min) / max(r, 1e-7))^g r + min; x = (x - mean(x)) sd / max(std(x), 1e-7) + mu;
        [invert: x = -x]

Blur, brightness, contrast and gamma run batched over the samples (and channels) they fire
for; noise loops over samples and low resolution over channels (each its own shape).
"""
import torch
import torch.nn.functional as F

BLUR_TRUNCATE = 6.0
EPS = 1e-7


def apply_intensity(x: torch.Tensor, params: dict, generator=None):
    """The intensity transforms in nnU-Net's order, in place on x (B, C, *P), with the
    parameters of `DeviceAugmentation.sample_parameters` (CPU tensors); `generator` (on x's
    device) draws the Gaussian noise."""
    device = x.device

    def firing(name):
        return torch.nonzero(params[name]).flatten().tolist()

    def per_channel(name, idx):
        return params[name][idx].to(device=device, dtype=x.dtype).view(len(idx), -1, 1, 1, 1)

    idx = firing("noise")
    for b in idx:  # one std for all channels of the sample, fresh noise per channel
        noise = torch.empty(x.shape[1:], device=device, dtype=x.dtype)
        noise.normal_(0.0, float(params["noise_std"][b]), generator=generator)
        x[b] += noise
    blur = [(b, c) for b in firing("blur") for c in range(x.shape[1]) if bool(params["blur_channel"][b, c])]
    if blur:
        bs, cs = zip(*blur)
        x[list(bs), list(cs)] = gaussian_blur(x[list(bs), list(cs)], params["blur_sigma"][list(bs), list(cs)])
    idx = firing("brightness")
    if idx:
        x[idx] *= per_channel("brightness_factor", idx)
    idx = firing("contrast")
    if idx:
        sub = x[idx]
        flat = sub.flatten(2)
        mean = flat.mean(2).view(*sub.shape[:2], 1, 1, 1)
        low, high = (v.view(*sub.shape[:2], 1, 1, 1) for v in torch.aminmax(flat, dim=2))
        sub = ((sub - mean) * per_channel("contrast_factor", idx) + mean).clamp_(low, high)
        x[idx] = sub
    for b in firing("lowres"):
        for c in range(x.shape[1]):
            if bool(params["lowres_channel"][b, c]):
                # the scale as batchgeneratorsv2 holds it (float32), for the same rounded shape
                scale = float(params["lowres_scale"][b, c].to(torch.float32))
                x[b, c] = simulate_low_resolution(x[b, c], scale)
    for name, invert in (("gamma_inverted", True), ("gamma", False)):
        idx = firing(name)
        if idx:
            x[idx] = gamma(x[idx], per_channel(f"{name}_value", idx), invert)

def blur_kernel_size(sigma: float, truncate: float = BLUR_TRUNCATE) -> int:
    """batchgeneratorsv2's _compute_kernel_size: the odd integer nearest to sigma * truncate + 0.5."""
    n = sigma * truncate + 0.5
    rounded = round(n)
    if rounded % 2 == 1:
        return rounded
    return rounded + 1 if n - rounded >= 0 else rounded - 1


def gaussian_blur(volumes: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each volume (N, D, H, W) with its own sigmas (N, 3) per axis,
    reflect padding. Kernels of every size are centred in one of the largest size (zero taps
    beyond a kernel's own size leave the result unchanged)."""
    n = volumes.shape[0]
    sizes = [[blur_kernel_size(float(s)) for s in row] for row in sigmas.tolist()]
    width = max(max(row) for row in sizes)
    half = width // 2
    kernels = torch.zeros((n, 3, width), dtype=torch.float64)
    for i in range(n):
        for axis in range(3):
            k = sizes[i][axis]
            # batchgeneratorsv2's _build_kernel: linspace(-(k-1)/2, (k-1)/2, k), pdf, normalised
            x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, k, dtype=torch.float32)
            pdf = torch.exp(-0.5 * (x / float(sigmas[i, axis])).pow(2))
            kernels[i, axis, half - k // 2: half + k // 2 + 1] = (pdf / pdf.sum()).double()
    kernels = kernels.to(device=volumes.device, dtype=volumes.dtype)
    out = volumes
    for axis in range(3):
        size = out.shape[axis + 1]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = half
        padded = F.pad(out[:, None], pad, mode="reflect")[:, 0]
        w = kernels[:, axis].view(n, width, 1, 1, 1)
        acc = None
        for t in range(width):
            term = padded.narrow(axis + 1, t, size) * w[:, t]
            acc = term if acc is None else acc.add_(term)
        out = acc
    return out


def simulate_low_resolution(volume: torch.Tensor, scale: float) -> torch.Tensor:
    """A (D, H, W) volume down to round(shape * scale) by nearest-exact, back by trilinear."""
    shape = volume.shape
    small = F.interpolate(volume[None, None], [round(s * scale) for s in shape], mode="nearest-exact")
    return F.interpolate(small, list(shape), mode="trilinear")[0, 0]


def gamma(x: torch.Tensor, g: torch.Tensor, invert: bool) -> torch.Tensor:
    """Gamma with retained mean and std on (N, C, *spatial), g (N, C, 1, 1, 1); `invert`: on
    the negated image (batchgeneratorsv2's GammaTransform, p_retain_stats 1)."""
    if invert:
        x = -x
    flat = x.flatten(2)
    mean, std = flat.mean(2), flat.std(2)
    low, high = torch.aminmax(flat, dim=2)
    rng = high - low
    shape = (*x.shape[:2],) + (1,) * (x.ndim - 2)
    low, rng = low.view(shape), rng.view(shape)
    x = ((x - low) / rng.clamp(min=EPS)).pow(g) * rng + low
    flat = x.flatten(2)
    mean_here, std_here = flat.mean(2).view(shape), flat.std(2).view(shape)
    x = (x - mean_here) * (std.view(shape) / std_here.clamp(min=EPS)) + mean.view(shape)
    return -x if invert else x
