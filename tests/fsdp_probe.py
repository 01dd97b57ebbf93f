"""The factor FSDP2 leaves on reduce-scattered gradients on this build, for the FSDP2 workers.

torch 2.7's FSDP2 on gloo sums the ranks' gradients instead of averaging them (the factor is
the world size); newer builds average (factor 1). A reference that is to match a sharded run
scales its loss, or its learning rate, by the factor measured here rather than by a constant."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def gradient_factor(mesh=None) -> float:
    """A ``fully_shard``-ed ``Linear``'s gradient on this rank's slice of a batch over the
    unsharded ``Linear``'s on the whole batch (collective: every rank of the default group calls
    it). ``mesh``: the 1-D device mesh to shard over (default: all ranks, CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = mesh if mesh is not None else init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ref = nn.Linear(4, 4)
    probe = nn.Linear(4, 4)
    probe.load_state_dict(ref.state_dict())
    fully_shard(probe, mesh=mesh)
    x = torch.randn(2 * world, 4, generator=torch.Generator().manual_seed(3))
    probe(x.chunk(world)[rank]).square().mean().backward()
    ref(x).square().mean().backward()
    return float(round(float(probe.weight.grad.full_tensor().norm() / ref.weight.grad.norm())))
