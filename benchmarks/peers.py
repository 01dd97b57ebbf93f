"""The implementations we are compared against, written from their public descriptions (not
copied): the most-used standalone SAM (a per-tensor loop), the bangyen/zsharp reproduction's
ZSharp (``torch.quantile`` over every |z|), and Composer's ``SAMOptimizer`` when Composer is installed.

Each exposes ``first_step()`` (perturb from .grad) and ``second_step()`` (restore + base step),
the optimizer-only part of a sharpness step.
"""
from __future__ import annotations

import torch


class LoopSAM:
    """Per-tensor Python loop: norm of norms, e = rho g / ||g|| saved per tensor, copy back."""

    def __init__(self, params, base, rho=0.05):
        self.params, self.base, self.rho, self.old = list(params), base, rho, {}

    @torch.no_grad()
    def first_step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.old[p] = p.data.clone()
            p.add_(p.grad * scale)

    @torch.no_grad()
    def second_step(self):
        for p in self.params:
            if p in self.old:
                p.data = self.old[p]
        self.base.step()


class QuantileZSharp(LoopSAM):
    """The bangyen/zsharp reproduction's ZSharp: z per tensor, one torch.quantile over all |z|, a tensor
    keeping nothing keeps its top 20%, SAM scaling."""

    def __init__(self, params, base, rho=0.05, percentile=70):
        super().__init__(params, base, rho)
        self.percentile = percentile

    @torch.no_grad()
    def first_step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        zs = [torch.zeros_like(g) if g.numel() < 2 else (g - g.mean()) / (g.std() + 1e-8) for g in grads]
        threshold = torch.quantile(torch.cat([z.abs().flatten() for z in zs]), self.percentile / 100.0)
        filtered = []
        for g, z in zip(grads, zs):
            mask = z.abs() >= threshold
            if mask.sum() == 0:
                k = max(1, int(0.2 * z.numel()))
                mask = z.abs() >= z.abs().flatten().topk(k).values[-1]
            filtered.append(g * mask)
        norm = torch.norm(torch.stack([f.norm(p=2) for f in filtered]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p, f in zip([p for p in self.params if p.grad is not None], filtered):
            self.old[p] = p.data.clone()
            p.add_(f * scale)


class ComposerSAM:
    """composer.algorithms.sam.SAMOptimizer driven through its own first/second step."""

    def __init__(self, params, base, rho=0.05):
        from composer.algorithms.sam import SAMOptimizer

        self.opt = SAMOptimizer(base, rho=rho)

    def first_step(self):
        self.opt.first_step()

    def second_step(self):
        self.opt.second_step()


class Ours:
    """Our optimizer's first_step / second_step (restore + base step), as ``step(closure)`` runs
    them: the first pass's gradients are dropped, the second backward's are used by the base."""

    def __init__(self, opt):
        self.opt = opt
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def first_step(self):
        self._second_grads = [p.grad for p in self.params]  # stand-ins for the second backward's
        self.opt.first_step(zero_grad=True)

    def second_step(self):
        for p, g in zip(self.params, self._second_grads):
            p.grad = g
        self.opt.second_step()


def optimizer_only_unit(impl, params, grads):
    """One timed unit: the implementation's first and second step, on a fresh copy of ``grads``
    set (untimed) by ``unit.prepare``: implementations may scale or mask the gradients in place,
    and re-filtering those would time a different input. Returns ``(unit, failure)``:
    ``failure`` is the error of a first try (recorded by the benchmarks, not hidden: e.g.
    ``torch.quantile``'s 2^24-element cap) or None."""
    buffers = [g.clone() for g in grads]

    def prepare():
        torch._foreach_copy_(buffers, grads)
        for p, b in zip(params, buffers):
            p.grad = b

    def unit():
        impl.first_step()
        impl.second_step()
        return 1

    unit.prepare = prepare
    try:
        prepare()
        unit()
    except Exception as err:
        return unit, f"{type(err).__name__}: {str(err)[:80]}"
    return unit, None
