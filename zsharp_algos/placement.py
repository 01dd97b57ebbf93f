r"""Where ``w' = w + e`` lives while the second pass runs, and the exact way back to ``w``.

Two strategies, chosen per parameter:

* **re-point** (the fast path): ``w'`` is built in memory nobody else needs during the second
  pass, and the parameter is pointed at it (``p.data = w'``); restoring points it back at its
  own, untouched tensor. Nothing is copied back, and SAM keeps no buffer between steps. The
  memory is the first-pass gradient's own (it holds ``e``, dead once ``w'`` is formed: the
  gradients are then freed, so the second backward starts from ``None``), or, for directions that
  keep a work buffer anyway (ZSharp), the parameter's region of that buffer.
* **in place** (always correct): ``w`` is saved to the parameter's region of the work buffer,
  ``w += e`` in place, and restoring copies the saved ``w`` back (bitwise).

A parameter is re-pointed only if it owns its storage alone (not a view, not a flat buffer
other weights view, not a tensor subclass) and, when ``w'`` goes into the gradient, the same
holds for the gradient (DDP's ``gradient_as_bucket_view`` buckets do not qualify); and only when
the caller lets the gradients go (``first_step(zero_grad=True)``). Everything else is in place.

The work buffer (:class:`WorkBuffer`): one flat tensor per device and dtype of the trainable
parameters, a view per parameter in the parameter's own layout. What it holds, when:

1. between steps: nothing of value (it stays allocated once made);
2. while the direction runs (:meth:`Placement.scratch`): float32 scratch for the direction's
   own work, tensor after tensor (ZSharp's ``|z|``);
3. from :meth:`Placement.apply` until :meth:`Placement.restore`: for each perturbed parameter,
   its region holds ``w`` (in place: the copy restored from) or ``w'`` (re-pointed into the
   buffer: the tensor the parameter points at).

SAM allocates it only if some parameter cannot be re-pointed; ZSharp allocates it on its first
step (its ``|z|`` needs it anyway).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ._tensors import group_by_device_dtype
from .order_stats import reads_host

__all__ = ["Placement", "WorkBuffer", "storage_sole_owner", "foreach_grouped"]


def foreach_grouped(op, dsts: Sequence[Tensor], srcs: Sequence[Tensor]) -> None:
    """``op(dsts, srcs)`` as one multi-tensor kernel per device/dtype group."""
    for _, (ds, ss) in group_by_device_dtype(dsts, srcs):
        op(ds, ss)


# --------------------------------------------------------------------------- ownership
def _storage_use_count(storage) -> int | None:
    """How many tensors share ``storage``, or None where torch does not say. The only use of
    a private torch API in the package; without it every parameter goes the in-place way."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    return None if counter is None else counter(storage._cdata)


@lru_cache(maxsize=None)
def _lone_use_count() -> int | None:
    # what a tensor that nothing else refers to reads (torch versions differ); the tensor must
    # stay alive while its storage is read
    alone = torch.empty(1)
    return _storage_use_count(alone.untyped_storage())


def storage_sole_owner(t: Tensor) -> bool:
    """Whether ``t`` is the only tensor on its storage, and spans all of it (False whenever
    that cannot be told)."""
    if t._base is not None or t.storage_offset() != 0:
        return False
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size():
        return False
    count = _storage_use_count(storage)
    return count is not None and count == _lone_use_count()


# --------------------------------------------------------------------------- the buffer
class WorkBuffer:
    """The persistent flat buffer (see the module doc for what it holds when)."""

    def __init__(self) -> None:
        self._views: dict[Tensor, Tensor] = {}  # param -> its region, in its layout
        self._flat: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def views(self, params: Sequence[Tensor], trainable: Callable[[], list[Tensor]]) -> list[Tensor]:
        """The regions of ``params``; allocated once for every trainable parameter (so the set
        of parameters with gradients may change between steps without reallocation)."""
        if any(p not in self._views for p in params):
            everything = trainable()
            known = set(everything)
            everything += [p for p in params if p not in known]
            self._views, self._flat = {}, {}
            for _, (ps,) in group_by_device_dtype(everything):
                flat = torch.empty(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
                self._flat[(flat.device, flat.dtype)] = flat
                offset = 0
                for p in ps:
                    view = flat[offset : offset + p.numel()]
                    # p's strides (channels_last too): copies to and from it are straight copies
                    self._views[p] = view.view(p.shape) if p.is_contiguous() else view.as_strided(p.shape, p.stride())
                    offset += p.numel()
        return [self._views[p] for p in params]

    def float32_scratch(self, device: torch.device, numel: int) -> Tensor | None:
        """The float32 flat tensor on ``device`` if it has ``numel`` elements to spare."""
        flat = self._flat.get((device, torch.float32))
        return flat[:numel] if flat is not None and flat.numel() >= numel else None

    @property
    def nbytes(self) -> int:
        """The bytes the buffer holds now, over every device and dtype."""
        return sum(f.numel() * f.element_size() for f in self._flat.values())


# --------------------------------------------------------------------------- placement
class Placement:
    """Moves parameters to ``w + e`` and back, by the two strategies of the module doc.

    Args:
        sole_owner: decides whether a tensor owns its storage alone; the default reads torch's
            storage use count (:func:`storage_sole_owner`). ``lambda t: False`` forces the
            in-place strategy everywhere.
    """

    def __init__(self, sole_owner: Callable[[Tensor], bool] = storage_sole_owner):
        self.buffer = WorkBuffer()
        self._sole_owner = sole_owner
        self._in_place: list[Tensor] = []  # restored by copying from their buffer region
        self._moved: list[tuple[Tensor, Tensor]] = []  # (param, its own tensor) while it points at w'

    @property
    def active(self) -> bool:
        """Whether some parameter is at ``w + e`` now."""
        return bool(self._in_place or self._moved)

    def scratch(self, params: Sequence[Tensor], trainable: Callable[[], list[Tensor]], numel: int) -> Tensor | None:
        """Stage 2 of the buffer: float32 scratch of ``numel`` elements on the parameters'
        device, free until :meth:`apply` (None if the parameters are not float32)."""
        self.buffer.views(params, trainable)
        return self.buffer.float32_scratch(params[0].device, numel)

    def can_repoint(self, param: Tensor, target: Tensor | None) -> bool:
        """Whether ``param`` may point at new memory (``target``: the gradient that would hold
        ``w'``, which must then qualify too and have the parameter's layout)."""
        if type(param) not in (Tensor, nn.Parameter) or not self._sole_owner(param):
            return False
        return target is None or (
            type(target) is Tensor and target.stride() == param.stride() and self._sole_owner(target)
        )

    def apply(
        self,
        params: Sequence[Tensor],
        directions: Sequence[Tensor],
        coefs: Sequence[Tensor],
        trainable: Callable[[], list[Tensor]],
        *,
        may_move: bool,
        into_buffer: bool,
        keep_e: bool = False,
    ) -> None:
        """``w <- w + c * d`` for each parameter: ``d`` given in ``directions`` (the gradients'
        memory), ``c`` its 0-dim coefficient (``e = c * d``). ``may_move``: the parameters may be
        re-pointed (the caller lets the gradients go); ``into_buffer``: build re-pointed ``w'`` in
        the work buffer rather than in the gradient; ``keep_e``: the gradients must hold ``e``
        afterwards (``may_move`` must be False then)."""
        if self.active:
            raise RuntimeError("the weights are already perturbed: restore() them before perturbing again")
        movable = [
            may_move and self.can_repoint(p, None if into_buffer else d) for p, d in zip(params, directions)
        ]
        in_place = [i for i, m in enumerate(movable) if not m]
        moved = [i for i, m in enumerate(movable) if m]
        saved = in_place + (moved if into_buffer else [])
        regions = self.buffer.views([params[i] for i in saved], trainable) if saved else []
        # in place: save w, then w += c * d (the same float operation as re-pointing: same bits)
        ws = [params[i] for i in in_place]
        foreach_grouped(torch._foreach_copy_, regions[: len(in_place)], ws)
        _fused_add(ws, ws, [directions[i] for i in in_place], [coefs[i] for i in in_place], keep_e)
        self._in_place = ws
        # re-point: w' = w + c * d, in the buffer or in d's own memory
        targets = regions[len(in_place) :] if into_buffer else [directions[i] for i in moved]
        _fused_add(targets, [params[i] for i in moved], [directions[i] for i in moved], [coefs[i] for i in moved])
        for i, w_prime in zip(moved, targets):
            p = params[i]
            self._moved.append((p, p.data))
            p.data = w_prime

    def restore(self) -> None:
        """Put every parameter back exactly (a no-op when nothing is perturbed)."""
        for p, own in reversed(self._moved):
            p.data = own
        self._moved = []
        if self._in_place:
            foreach_grouped(torch._foreach_copy_, self._in_place, self.buffer.views(self._in_place, list))
        self._in_place = []


def _scale(idx: Sequence[int], tensors: Sequence[Tensor], coefs: Sequence[Tensor]) -> None:
    """``tensors[i] *= coefs[i]`` for ``i`` in ``idx``: one multi-tensor kernel per device/dtype
    (its Tensor overload when one coefficient serves them all)."""
    ts = [tensors[i] for i in idx]
    cs = [coefs[i] for i in idx]
    for group, (gs,) in group_by_device_dtype(ts):
        mine = [cs[j] for j in group]
        if all(c is mine[0] for c in mine):
            torch._foreach_mul_(gs, mine[0].to(gs[0].device))
        else:
            torch._foreach_mul_(gs, [c.to(gs[0].device) for c in mine])


def _fused_add(
    dsts: Sequence[Tensor], ws: Sequence[Tensor], ds: Sequence[Tensor], coefs: Sequence[Tensor], keep_e: bool = False
) -> None:
    """``dsts[i] = ws[i] + coefs[i] * ds[i]`` (``dsts[i]`` may be ``ds[i]`` or ``ws[i]``); with
    ``keep_e``, ``ds[i]`` holds ``e = coefs[i] * ds[i]`` afterwards. Where host reads are free
    (the CPU strategy of :mod:`zsharp_algos.order_stats`) the coefficients are read once and each
    tensor is one ``torch.add(w, d, alpha=c, out=...)``, a single pass (its multiply-add may be
    fused, rounded once); elsewhere multi-tensor kernels: scale ``d`` into ``e``, then add ``w``
    (copying it first where the destination is neither), a launch per device/dtype group rather
    than per tensor."""
    if not dsts:
        return
    if reads_host(dsts[0].device):
        values = _host_values(coefs)
        for dst, w, d, c in zip(dsts, ws, ds, values):
            # detached: with a parameter that requires grad as an input, the out= add takes a
            # path about 25 times slower, even under no_grad
            torch.add(w.detach(), d, alpha=c, out=dst.detach())
            if keep_e:
                d.mul_(c)
        return
    _scale(range(len(ds)), ds, coefs)
    for idx, (out, a, b) in group_by_device_dtype(dsts, ws, ds):
        if all(o is d for o, d in zip(out, b)):
            torch._foreach_add_(out, a)
        elif all(o is w for o, w in zip(out, a)):
            torch._foreach_add_(out, b)
        else:
            torch._foreach_copy_(out, a)
            torch._foreach_add_(out, b)


def _host_values(coefs: Sequence[Tensor]) -> list[float]:
    """The coefficients as Python floats, one read per distinct tensor (CPU tensors: no wait)."""
    seen: dict[int, float] = {}
    bases: dict[int, list[float]] = {}
    out = []
    for c in coefs:
        if id(c) not in seen:
            base = c._base  # one read for all the views of a per-tensor vector
            if base is not None and base.dim() == 1:
                values = bases.setdefault(id(base), base.tolist())
                seen[id(c)] = values[c.storage_offset() - base.storage_offset()]
            else:
                seen[id(c)] = c.item()
        out.append(seen[id(c)])
    return out
