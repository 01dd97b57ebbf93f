"""Straightforward reference definitions, written from their descriptions in shared/REFERENCE.md
(per-tensor Python loops, ``torch.quantile``, no chunking): what the library must reproduce."""
from __future__ import annotations

import torch


def sam_perturbation(params, grads, rho, eps=1e-12, adaptive=False):
    """e = rho * T^2 g / ||T g||, T = |w| or 1."""
    t = [p.abs() if adaptive else torch.ones_like(p) for p in params]
    norm = torch.norm(torch.stack([(ti * g).norm(p=2) for ti, g in zip(t, grads)]), p=2)
    return [rho * ti * ti * g / (norm + eps) for ti, g in zip(t, grads)]


def zscore(g):
    if g.numel() < 2:
        return torch.zeros_like(g)
    return (g - g.mean()) / (g.std() + 1e-8)


def stat(g):
    """The precision statistics are taken in: float64 gradients keep theirs, others float32."""
    return g if g.dtype == torch.float64 else g.float()


def zsharp_global_masks(grads, percentile=70.0):
    """The bangyen/zsharp reproduction (reference A): one percentile of |z| over all tensors, keep |z| >= it, a
    tensor keeping nothing keeps its top max(1, floor(0.2 n)) entries by |z|."""
    zs = [zscore(stat(g)) for g in grads]
    threshold = torch.quantile(torch.cat([z.abs().flatten() for z in zs]), percentile / 100.0)
    masks = []
    for z in zs:
        mask = z.abs() >= threshold
        if not mask.any():
            k = max(1, int(0.2 * z.numel()))
            kth_largest = z.abs().flatten().topk(k).values[-1]
            mask = z.abs() >= kth_largest
        masks.append(mask)
    return masks


def zsharp_global_perturbation(grads, rho, percentile=70.0):
    masks = zsharp_global_masks(grads, percentile)
    filtered = [g * m for g, m in zip(grads, masks)]
    norm = torch.norm(torch.stack([f.norm(p=2) for f in filtered]), p=2)
    return [rho * f / (norm + 1e-12) for f in filtered]


def zsharp_tensor_perturbation(grads, rho, percentile=95.0):
    """The paper's code (reference B): only ndim > 1 tensors are filtered, each by its own
    quantile of |z| (strict >), each normalised alone; others and empty filters: SAM scaling."""
    raw_norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
    out = []
    for g in grads:
        if g.dim() > 1:
            z = zscore(stat(g)).abs()
            filtered = g * (z > torch.quantile(z.flatten(), percentile / 100.0))
            fnorm = filtered.norm(p=2)
            if fnorm > 0:
                out.append(rho * filtered / (fnorm + 1e-12))
                continue
        out.append(rho * g / (raw_norm + 1e-12))
    return out


def sharpness_step(model, loss_fn, base_opt, perturbation, bn_frozen=True):
    """One two-pass step done by hand: first pass, e, second pass at w+e (BN stats restored
    after), w restored by copy, base step."""
    params = [p for p in model.parameters() if p.requires_grad]
    base_opt.zero_grad()
    loss = loss_fn(model)
    loss.backward()
    with torch.no_grad():
        grads = [p.grad.clone() for p in params]
        e = perturbation(params, grads)
        saved = [p.clone() for p in params]
        for p, ei in zip(params, e):
            p.add_(ei)
    buffers = {n: b.clone() for n, b in model.named_buffers()} if bn_frozen else {}
    base_opt.zero_grad()
    loss_fn(model).backward()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    base_opt.step()
    return loss


def centred(g):
    """GCSAM's direction: each output channel (first dimension) of a tensor with ndim > 1 minus
    its mean; other tensors as they are."""
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g.clone()


class PaperFriendlySAM:
    """FriendlySAM as the ZSharp paper's official code steps it (a per-tensor loop), written from
    its description: on a tensor's first step the momentum is the gradient and the direction the
    gradient; afterwards the direction is g - sigma * momentum, then momentum <- lmbda * momentum
    + (1 - lmbda) * g; e = rho * T^2 d / (||T d|| + 1e-12); w restored from a copy after the
    second pass, then the base optimizer steps."""

    def __init__(self, params, base, rho=0.05, sigma=1.0, lmbda=0.9, adaptive=False):
        self.params, self.base = list(params), base
        self.rho, self.sigma, self.lmbda, self.adaptive = rho, sigma, lmbda, adaptive
        self.momentum, self.old = {}, {}

    @torch.no_grad()
    def first_step(self):
        for p in self.params:
            if p.grad is None:
                continue
            g = p.grad.clone()
            if p not in self.momentum:
                self.momentum[p] = g
            else:
                p.grad -= self.momentum[p] * self.sigma
                self.momentum[p] = self.momentum[p] * self.lmbda + g * (1 - self.lmbda)
        norm = torch.norm(torch.stack([((p.abs() if self.adaptive else 1.0) * p.grad).norm(p=2)
                                       for p in self.params if p.grad is not None]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.old[p] = p.data.clone()
            p.add_((p.pow(2) if self.adaptive else 1.0) * p.grad * scale)

    @torch.no_grad()
    def second_step(self):
        for p in self.params:
            if p in self.old:
                p.data = self.old[p]
        self.base.step()
