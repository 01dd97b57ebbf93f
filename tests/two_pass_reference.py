"""Hand-written references for sharpness-aware training inside frameworks (HF Trainer,
accelerate): plain autograd, one pass at a time, no library code except the perturbation
formulas in ``reference.py``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Points(Dataset):
    """Random 6-d points in 3 classes, as the dicts a transformers Trainer feeds the model."""

    def __init__(self, n=48, seed=1):
        gen = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(nn.Module):
    """A classifier speaking the Trainer's dict protocol that records every training batch."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.inject_inf_at: set[int] = set()  # training forward calls (from 0) whose input becomes inf
        self.calls = 0

    def forward(self, x, labels=None):
        if self.training:
            self.seen.append((x.detach().clone(), labels.detach().clone()))
            if self.calls in self.inject_inf_at:
                x = x * float("inf")
            self.calls += 1
        logits = self.body(x)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def mlp(seed: int = 0, bn: bool = True) -> nn.Sequential:
    """A tiny MLP; with BatchNorm (and no bias before it, whose true gradient is 0)."""
    torch.manual_seed(seed)
    if bn:
        return nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def two_pass_gradient(model, loss_fn, perturbation):
    """The gradient at ``w + e(grad L(w))``. The first pass updates BatchNorm statistics, the
    second does not; the weights are left as they were."""
    params = trainable(model)
    g1 = torch.autograd.grad(loss_fn(model), params)
    with torch.no_grad():
        e = perturbation(params, list(g1))
        saved = [p.clone() for p in params]
        buffers = [b.clone() for b in model.buffers()]
        for p, ei in zip(params, e):
            p.add_(ei)
    g2 = torch.autograd.grad(loss_fn(model), params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
        for b, s in zip(model.buffers(), buffers):
            b.copy_(s)
    return list(g2)


def apply_gradient(model, grads, optimizer, max_grad_norm=None) -> None:
    """Set ``.grad`` to ``grads`` (clipped to ``max_grad_norm`` if given) and step."""
    params = trainable(model)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()


def ce_loss(x, y, scale=1.0):
    return lambda model: F.cross_entropy(model(x), y) * scale


def accumulated_step(model, micro_batches, perturbation, optimizer, max_grad_norm=None) -> None:
    """Gradient accumulation: each micro-batch (loss divided by their number) is perturbed by
    its own gradient; the second-pass gradients are summed; one base step."""
    total = None
    for x, y in micro_batches:
        g = two_pass_gradient(model, ce_loss(x, y, 1.0 / len(micro_batches)), perturbation)
        total = g if total is None else [a + b for a, b in zip(total, g)]
    apply_gradient(model, total, optimizer, max_grad_norm)


def data_parallel_step(model, rank_batches, perturbation, optimizer, sync_first_pass=False) -> None:
    """DDP: every rank perturbs with its OWN first-pass gradient (``sync_first_pass=False``, what
    the library does) or with the all-reduced one; the step uses the mean second-pass gradient."""
    if sync_first_pass:
        params = trainable(model)
        g1 = [torch.autograd.grad(ce_loss(x, y)(model), params) for x, y in rank_batches]
        mean_g1 = [torch.stack(gs).mean(0) for gs in zip(*g1)]
        with torch.no_grad():
            e = perturbation(params, mean_g1)
            saved = [p.clone() for p in params]
            for p, ei in zip(params, e):
                p.add_(ei)
        g2 = [torch.autograd.grad(ce_loss(x, y)(model), params) for x, y in rank_batches]
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    else:
        g2 = [two_pass_gradient(model, ce_loss(x, y), perturbation) for x, y in rank_batches]
    apply_gradient(model, [torch.stack(gs).mean(0) for gs in zip(*g2)], optimizer)


def data_parallel_run(model, steps, perturbation, optimizer, due, sync_first_pass=False, reuse_alpha=None) -> None:
    """DDP with gradient accumulation, written out one rank and one micro-batch at a time.

    ``steps[t][r]`` is rank ``r``'s list of micro-batches at step ``t``; each micro-batch's loss
    is divided by their number (as ``accelerator.backward`` does). A plain step (not ``due(t)``)
    uses the ranks' mean of the summed gradients. On a sharpness step each micro-batch is
    perturbed by its own first-pass gradient: this rank's, or with ``sync_first_pass`` the
    ranks' mean; the step uses the ranks' mean of the summed second-pass gradients.
    ``reuse_alpha``: LookSAM (Liu et al., 2022) on top, with ``g`` the step's first-pass gradient
    (the micro-batches' ranks' means, summed): a sharpness step keeps
    ``g_v = g_s - (<g, g_s> / ||g||^2) g``, a plain step after one uses
    ``g + reuse_alpha * ||g|| / ||g_v|| * g_v``."""
    params = trainable(model)
    g_v = None

    def flat(ts):
        return torch.cat([t.reshape(-1) for t in ts])

    def mean(per_rank):
        return [torch.stack(gs).mean(0) for gs in zip(*per_rank)]

    def total(per_micro):
        return [torch.stack(gs).sum(0) for gs in zip(*per_micro)]

    for t, rank_micro in enumerate(steps):
        n = len(rank_micro[0])

        def grad(x, y):
            return list(torch.autograd.grad(ce_loss(x, y, 1.0 / n)(model), params))

        first = [[grad(x, y) for x, y in micro] for micro in rank_micro]  # [rank][micro], all at w
        if not due(t):
            g = mean([total(f) for f in first])
            if reuse_alpha is not None and g_v is not None:
                coef = reuse_alpha * flat(g).norm() / flat(g_v).norm()
                g = [gi + coef * vi for gi, vi in zip(g, g_v)]
            apply_gradient(model, g, optimizer)
            continue
        second = []
        for r, micro in enumerate(rank_micro):
            sums = None
            for m, (x, y) in enumerate(micro):
                g1 = mean([f[m] for f in first]) if sync_first_pass else first[r][m]
                with torch.no_grad():
                    e = perturbation(params, g1)
                    saved = [p.clone() for p in params]
                    for p, ei in zip(params, e):
                        p.add_(ei)
                g2 = grad(x, y)
                with torch.no_grad():
                    for p, w in zip(params, saved):
                        p.copy_(w)
                sums = g2 if sums is None else [a + b for a, b in zip(sums, g2)]
            second.append(sums)
        g_s = mean(second)
        if reuse_alpha is not None:
            g = total([mean([f[m] for f in first]) for m in range(n)])
            fg, fs = flat(g), flat(g_s)
            g_v = [si - (fg @ fs) / (fg @ fg) * gi for si, gi in zip(g_s, g)]
        apply_gradient(model, g_s, optimizer)


def lookahead_run(model, batches, perturbation, optimizer) -> None:
    """The single-pass callback variant: step t's forward/backward runs at w_t + e(g_{t-1}), the
    base step is taken from w_t with that gradient (no perturbation on the first step)."""
    params = trainable(model)
    kept = None
    for x, y in batches:
        saved = [p.detach().clone() for p in params]
        if kept is not None:
            with torch.no_grad():
                for p, ei in zip(params, perturbation(params, kept)):
                    p.add_(ei)
        g = list(torch.autograd.grad(ce_loss(x, y)(model), params))
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        apply_gradient(model, g, optimizer)
        kept = g


def assert_same(actual: dict, expected: dict, exact: bool = True, rtol=1e-5, atol=1e-6) -> None:
    """State dicts equal: bitwise (``exact``) or within tolerance."""
    assert actual.keys() == expected.keys()
    for k in actual:
        a, e = actual[k], expected[k]
        if exact:
            assert torch.equal(a, e), f"{k} differs by {(a.double() - e.double()).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
