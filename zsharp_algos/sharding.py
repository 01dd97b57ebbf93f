r"""Sharded parameters (FSDP2's ``fully_shard``): the local shards, and the few collectives that
make the perturbation equal the unsharded one.

Under FSDP2 every parameter and gradient is a ``DTensor`` whose local tensor holds one shard of
the entries (``Shard(0)``; with HSDP, a 2-D mesh ``(Replicate(), Shard(0))``, the shard group is
the mesh's shard dimension and the replicas compute the same thing). The perturbation math runs
on the local shards, exactly as on whole tensors, and every quantity that spans a tensor or the
model is completed across the shard group:

* norms (SAM's global norm, ZSharp's per-tensor norms): squared shard norms, summed;
* ZSharp's per-tensor mean and std: the segment sums of the two-pass statistics, summed;
* ZSharp's thresholds: each radix round's histogram of every tensor, summed (integer counts:
  exact), and the successor and largest-``|z|`` searches, a minimum and a maximum;
* the logged :mod:`statistics <zsharp_algos.stats>`: one sum of three numbers.

So the thresholds are the exact order statistics of the whole model's ``|z|`` (not a shard's), a
tensor's keep-nothing fallback is decided on the whole tensor, and every rank perturbs its own
shard by the same rule. About a dozen collectives per step, whatever the number of tensors;
each is a device op (no host sync). Results that are replicated (norms, thresholds) are the
same bits on every rank: an all-reduce hands every rank the same sums.

The first pass's gradient is FSDP's reduce-scattered one, i.e. the gradient of the global batch:
every rank perturbs along the same, global direction (as DDP's synchronised first pass).

Not covered (refused with a message, before any weight changes): parameters sharded over more
than one mesh dimension (tensor parallelism), ``Partial`` placements, FSDP2's CPU offload
(shards on the CPU, mesh on the GPU), FSDP1's flat parameters, and a model whose perturbed
parameters mix DTensors and plain tensors (wrap the root module with ``fully_shard`` too).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Shards", "shards_of", "is_sharded", "local"]


def _dtensor_type():
    # A DTensor can only exist once torch.distributed.tensor is imported: looking it up in
    # sys.modules costs nothing and keeps `import zsharp_algos` from importing it.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or gradient)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the very tensor FSDP2 all-gathers from: in-place changes
    to it change the parameter), or ``t`` itself."""
    return t._local_tensor if is_sharded(t) else t


@dataclass(frozen=True, eq=False)
class Shards:
    """The process group a set of tensors is sharded over, and the reductions across it.

    Attributes:
        group: the ``torch.distributed`` process group of the shard mesh dimension.
        size: its number of processes.
        numels: each tensor's global number of entries (its local shard may be smaller, or empty).
    """

    group: object
    size: int
    numels: tuple[int, ...]

    def _reduce(self, t: Tensor, op) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=op, group=self.group)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` in place with a sum (``t`` contiguous, not an expanded view)."""
        import torch.distributed as dist

        return self._reduce(t, dist.ReduceOp.SUM)

    def max_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` in place with a maximum."""
        import torch.distributed as dist

        return self._reduce(t, dist.ReduceOp.MAX)

    def min_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` in place with a minimum."""
        import torch.distributed as dist

        return self._reduce(t, dist.ReduceOp.MIN)

    def sub(self, numels: Sequence[int]) -> "Shards":
        """The same group for another list of tensors (their global sizes)."""
        return Shards(self.group, self.size, tuple(int(n) for n in numels))


def shards_of(params: Sequence[Tensor]) -> Shards | None:
    """The :class:`Shards` of ``params`` if they are FSDP2 DTensors, None if none is; raises on
    a mix, on more than one shard dimension, on different meshes and on ``Partial``."""
    flags = [is_sharded(p) for p in params]
    if not any(flags):
        if any(type(p).__name__ == "FlatParameter" for p in params):
            raise ValueError(
                "these parameters are FSDP1 flat parameters (FullyShardedDataParallel): sharpness-aware "
                "optimizers need each tensor whole or as an FSDP2 shard; use FSDP2 (torch.distributed.fsdp."
                "fully_shard; accelerate fsdp_version: 2; transformers fsdp_config version 2; Composer "
                "parallelism_config={'fsdp2': ...})"
            )
        return None
    if not all(flags):
        plain = sum(not f for f in flags)
        raise ValueError(
            f"{plain} of the {len(params)} perturbed parameters are plain tensors and the others FSDP2 "
            "DTensors: apply fully_shard to the root module as well (model = fully_shard(model) after "
            "sharding its layers), so every parameter is sharded"
        )
    from torch.distributed.tensor import Replicate, Shard

    mesh, shard_dim = None, None
    for p in params:
        dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
        others = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
        if others:
            raise ValueError(
                f"a parameter has placements {p.placements}: sharpness-aware optimizers support "
                "Shard and Replicate placements (FSDP2, HSDP), not Partial"
            )
        if len(dims) > 1:
            raise ValueError(
                f"a parameter is sharded over {len(dims)} mesh dimensions ({p.placements}): "
                "sharpness-aware optimizers support FSDP2 and HSDP (one shard dimension), not tensor "
                "parallelism"
            )
        if p._local_tensor.device.type != p.device_mesh.device_type:
            raise ValueError(
                f"a parameter's shard is on {p._local_tensor.device.type} while its mesh is on "
                f"{p.device_mesh.device_type} (FSDP2 CPU offload): sharpness-aware optimizers do not support "
                "offloaded parameters yet; drop offload_policy=CPUOffloadPolicy()"
            )
        dim = dims[0] if dims else None
        if mesh is None:
            mesh, shard_dim = p.device_mesh, dim
        elif p.device_mesh != mesh or dim != shard_dim:
            raise ValueError(
                "the perturbed parameters are sharded over different device meshes: sharpness-aware "
                "optimizers need one FSDP2 mesh for the whole model"
            )
    numels = tuple(p.numel() for p in params)
    if shard_dim is None:  # replicated everywhere: nothing to complete
        return None
    return Shards(mesh.get_group(shard_dim), mesh.size(shard_dim), numels)
