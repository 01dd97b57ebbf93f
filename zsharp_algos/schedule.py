"""Which optimizer steps are sharpness steps (two passes), and which are plain ones (one pass).

For a param group with ``interval = k`` and the 0-based index ``t`` of the coming step (the
number of optimizer steps taken before it, or a framework's own counter):

* ``interval_mode="fixed"``: steps ``k - 1, 2k - 1, ...``, i.e. ``(t + 1) % k == 0`` (the
  ``k``-th, ``2k``-th, ... counting from 1), Composer's ``interval``;
* ``interval_mode="random"`` (RST, Zhao et al., 2022, "Randomized Sharpness-Aware Training"):
  step ``t`` with probability ``1 / k``, decided by ``u(seed, t) < 1 / k`` where ``u`` is a
  uniform number in ``[0, 1)`` computed from the seed and the step index alone (SplitMix64, a
  bijective integer mix). No generator state exists to save or to lose: two optimizers built
  alike decide alike, every rank of a data-parallel run decides alike without communicating,
  and a resumed run decides as the uninterrupted one did.

The decisions are Python integers and floats: no tensor, no device work.
"""
from __future__ import annotations

__all__ = ["MODES", "sharpness_due", "uniform"]

#: The values of ``interval_mode``.
MODES = ("fixed", "random")
_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Steele, Lea and Flood's SplitMix64 finaliser: every bit of x moves every bit of the result
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """A number in ``[0, 1)``, a pure function of ``seed`` and ``step`` (53 random bits)."""
    return (_splitmix64(_splitmix64(seed) ^ (step & _MASK)) >> 11) / float(1 << 53)


def sharpness_due(step: int, interval: int, mode: str = "fixed", seed: int = 0) -> bool:
    """Whether step ``step`` (0-based) is a sharpness step for ``interval`` and ``mode`` (module
    doc): the one statement of the rule."""
    if interval == 1:
        return True
    if mode == "fixed":
        return (step + 1) % interval == 0
    return uniform(seed, step) < 1.0 / interval
