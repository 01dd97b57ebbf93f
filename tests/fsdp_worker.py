"""FSDP2 checks, run by tests/test_fsdp.py under ``torchrun --nproc_per_node N`` (gloo, CPU).

Every rank trains a ``fully_shard``-ed copy of a small model on its slice of each global batch
and, alone, an unsharded copy on the whole batch (the reference), then writes what it measured
to ``<out>/rank<r>.json``:

* ``runs``: per configuration, the largest relative weight difference (per tensor, Frobenius)
  between the sharded and the unsharded run after the steps, and the replicated results of the
  last step (SAM/ZSharp norms, thresholds) as bit patterns, to be compared across ranks; for
  LookSAM (``reuse="looksam"``), ``reuse_state``: whether every parameter's stored ``g_v`` is a
  DTensor laid out as the parameter (mesh, placements, local shape) and its largest relative
  difference from the unsharded run's ``g_v``;
* ``masks``: per ZSharp configuration, how many entries of the sharded filter's mask differ from
  the unsharded filter's on the same gradients, and how many of those lie at a round-off tie;
* ``resume``: per configuration of :data:`RESUME_CONFIGS`, whether a run saved to a sharded
  checkpoint (torch.distributed.checkpoint) after k steps and resumed in fresh objects ends
  bitwise equal to the uninterrupted run (weights, and LookSAM's ``g_v`` where there is one).

``--mesh 2x2``: the HSDP layout (replicate x shard) on 4 ranks, with the DTensors placed by
the worker (:func:`run_configs_placed`).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsharp_algos  # noqa: E402
from zsharp_algos import GCSAM, GSAM, SAM, ClosureGradScaler, FriendlySAM, ZSharp  # noqa: E402
from zsharp_algos import directions as D  # noqa: E402
from zsharp_algos.options import KEY_PREFIX  # noqa: E402

from fsdp_probe import gradient_factor  # noqa: E402  (this script's folder is on sys.path)

CONFIGS = {
    "sam": dict(cls=SAM, rho=0.05),
    "sam_adaptive": dict(cls=SAM, rho=0.5, adaptive=True),
    "zsharp_global": dict(cls=ZSharp, rho=0.05, percentile=70),
    "zsharp_tensor": dict(cls=ZSharp, rho=0.05, percentile=95, scope="tensor"),
    "zsharp_adaptive": dict(cls=ZSharp, rho=0.5, percentile=70, adaptive=True),
    "zsharp_interval2": dict(cls=ZSharp, rho=0.05, percentile=70, interval=2),
    # LookSAM: over the 3 steps, plain (no g_v yet), sharpness (g_v stored), plain (g_v reused);
    # its inner products and norms are completed across the shards
    "sam_looksam_interval2": dict(cls=SAM, rho=0.05, interval=2, reuse="looksam"),
    # random intervals: seed 10 draws sharpness, plain (g_v reused), sharpness for steps 0-2
    # (zsharp_algos.schedule.sharpness_due), on every rank alike
    "zsharp_looksam_random": dict(cls=ZSharp, rho=0.05, percentile=70, interval=2, interval_mode="random",
                                  interval_seed=10, reuse="looksam"),
    # the SAM family: FriendlySAM's m (state sharded as the parameter), GSAM's inner products
    # across the shards, GCSAM's per-row means (a shard holds whole rows), ZSharp over FriendlySAM
    "friendlysam": dict(cls=FriendlySAM, rho=0.05),
    "gsam": dict(cls=GSAM, rho=0.05, alpha=0.3),
    "gcsam": dict(cls=GCSAM, rho=0.05),
    "zsharp_friendly": dict(cls=ZSharp, rho=0.05, percentile=70, variant="friendly", interval=2),
    # FSDP2 options: weights kept unsharded between forward and backward; bf16 compute (the
    # shards stay float32, the second pass computes in bf16 at the all-gathered w + e)
    "zsharp_no_reshard": dict(cls=ZSharp, rho=0.05, percentile=70, fsdp=dict(reshard_after_forward=False)),
    "sam_bf16_policy": dict(cls=SAM, rho=0.05, fsdp=dict(mp="bf16")),
    "zsharp_bf16_policy": dict(cls=ZSharp, rho=0.05, percentile=70, fsdp=dict(mp="bf16")),
}
STEPS = 3
RESUME_CONFIGS = {
    "zsharp_interval2": dict(cls=ZSharp, rho=0.05, percentile=70, interval=2),
    # seed 10 draws S . S . S for steps 0-4: the checkpoint after step 2 holds the g_v that the
    # resumed step 3 reuses, and the draws of steps 3 and 4 come from the restored step counter
    "zsharp_looksam_random": CONFIGS["zsharp_looksam_random"],
    "friendlysam": CONFIGS["friendlysam"],  # m and its Python-bool "started" flag through DCP
}


class Net(nn.Module):
    """Tensors of many shapes: some with fewer rows than ranks (empty shards), a 1-entry one."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 64)
        self.norm = nn.LayerNorm(64)
        self.hidden = nn.Linear(64, 48)
        self.head = nn.Linear(48, 3)  # 3 rows: on 4 ranks one shard is empty
        self.scale = nn.Parameter(torch.ones(1))  # 1 entry: z = 0

    def forward(self, x):
        h = torch.relu(self.norm(self.inp(x)))
        return self.head(torch.relu(self.hidden(h))) * self.scale


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def shard(model, mesh, reshard_after_forward=True, mp=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mp == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in (model.inp, model.hidden, model.head):
        fully_shard(layer, **kw)
    return fully_shard(model, **kw)


def batches(n, size=16):
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(size, 12, generator=g), torch.randn(size, 3, generator=g)) for _ in range(n)]


class Bf16Compute(nn.Module):
    """What FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16)`` computes, unsharded: the forward
    on bf16 casts of the float32 weights and of the inputs, the gradient cast back to float32."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        params = {n: p.to(torch.bfloat16) for n, p in self.model.named_parameters()}
        return torch.func.functional_call(self.model, params, (x.to(torch.bfloat16),))


def make_opt(cfg, params):
    kw = {k: v for k, v in cfg.items() if k not in ("cls", "fsdp")}
    return cfg["cls"](params, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw)


def train(model, opt, data, dp_rank, dp_size, factor, start=0):
    """Steps ``start..`` of a closure loop; the reference (dp_size=1) scales its loss by
    ``factor`` so both take the same step."""
    for x, y in data[start:]:
        xs, ys = x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xs).float(), ys) * factor
            loss.backward()
            return loss

        opt.step(closure)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rel_diffs(sharded, ref):
    out = {}
    for (name, p), q in zip(sharded.named_parameters(), ref.parameters()):
        w = full(p.detach())
        out[name] = float((w - q.detach()).norm() / q.detach().norm().clamp(min=1e-30))
    return out


def bits(t: torch.Tensor) -> list[int]:
    return [struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in t.reshape(-1).float().tolist()]


class Recorder:
    """Captures the thresholds and norms of each filter call (replicated results)."""

    def __init__(self):
        self.thresholds, self.norms = [], []
        self._apply = D._apply_masks
        self._coefficients = zsharp_algos.engine.coefficients

    def __enter__(self):
        def apply(ws, thresholds, *a, **k):
            self.thresholds.append(thresholds.clone())
            return self._apply(ws, thresholds, *a, **k)

        def coefficients(owners, norms):
            self.norms.append(norms.clone())
            return self._coefficients(owners, norms)

        D._apply_masks = apply
        zsharp_algos.engine.coefficients = coefficients
        return self

    def __exit__(self, *exc):
        D._apply_masks = self._apply
        zsharp_algos.engine.coefficients = self._coefficients


def run_configs(mesh, dp_rank, dp_size, factor):
    data = batches(STEPS)
    out = {}
    for name, cfg in CONFIGS.items():
        sharded = shard(make_model(), mesh, **cfg.get("fsdp", {}))
        ref = make_model()
        opt_s, opt_r = make_opt(cfg, sharded.parameters()), make_opt(cfg, ref.parameters())
        with Recorder() as rec:
            train(sharded, opt_s, data, dp_rank, dp_size, 1.0)
        if cfg.get("fsdp", {}).get("mp") == "bf16":  # the reference computes in bf16 too
            train(Bf16Compute(ref), opt_r, data, 0, 1, factor)
        else:
            train(ref, opt_r, data, 0, 1, factor)
        diffs = rel_diffs(sharded, ref)
        out[name] = {
            "max_rel_diff": max(diffs.values()),
            "rel_diffs": diffs,
            "replicated_bits": [bits(t) for t in rec.thresholds + rec.norms],
            "step_count": opt_s.step_count,
            "stats": {k: v for k, v in opt_s.stats.pop().items()},
            "stats_ref": {k: v for k, v in opt_r.stats.pop().items()},
        }
        if keeps_state(cfg):
            out[name]["reuse_state"] = reuse_state(opt_s, list(sharded.parameters()), opt_r, list(ref.parameters()))
    return out


def keeps_state(cfg) -> bool:
    """Whether the configuration keeps per-parameter state of its own (LookSAM, FriendlySAM)."""
    return cfg.get("reuse") == "looksam" or cfg["cls"] is FriendlySAM or cfg.get("variant") == "friendly"


def own_tensors(opt, param) -> dict:
    """The optimizer's own per-parameter tensors (``sharpness_*`` keys): LookSAM's g_v, FriendlySAM's m."""
    return {k: v for k, v in opt.state[param].items() if k.startswith(KEY_PREFIX) and torch.is_tensor(v)}


def reuse_state(opt_s, params, opt_r, ref_params):
    """The optimizer's own state (LookSAM's g_v, FriendlySAM's m) on the sharded run against the
    parameters' layout and the unsharded run's (the reference scales its loss by FSDP2's factor:
    the same g_v; m scales with the gradient, so it is compared after that factor)."""
    from torch.distributed.tensor import DTensor

    laid_out, rel = [], []
    for p, q in zip(params, ref_params):
        mine, theirs = own_tensors(opt_s, p), own_tensors(opt_r, q)
        if not mine or mine.keys() != theirs.keys():
            return {"present": False}
        for key, got in mine.items():
            want = theirs[key]
            laid_out.append(
                isinstance(got, DTensor) and got.device_mesh == p.device_mesh and got.placements == p.placements
                and got.to_local().shape == p.to_local().shape
            )
            rel.append(float((full(got) - want).norm() / want.norm().clamp(min=1e-30)))
    return {"present": True, "dtensor_like_param": all(laid_out), "max_rel_diff": max(rel)}


def run_configs_placed(mesh):
    """As :func:`run_configs` with DTensor parameters placed directly on ``mesh`` (HSDP's
    ``(Replicate(), Shard(0))`` on a 2-D mesh) and each pass's gradient that of the whole batch,
    computed on an unsharded copy at the current (gathered) weights and distributed likewise.
    FSDP2's own HSDP cannot run on CPU with torch 2.7 (its post-backward asserts a stream
    event, which CPU devices do not record), so this drives the optimizer on the same layout."""
    from torch.distributed.tensor import distribute_tensor

    placements = mesh_placements(mesh)
    data = batches(STEPS)
    out = {}
    for name, cfg in CONFIGS.items():
        if "fsdp" in cfg:  # FSDP2's own options: not in a layout placed by hand
            continue
        ref = make_model()
        worker = make_model()  # computes each pass's gradient at the gathered weights
        params = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, placements)) for p in make_model().parameters()]
        opt_s, opt_r = make_opt(cfg, params), make_opt(cfg, ref.parameters())
        with Recorder() as rec:
            for x, y in data:

                def closure():
                    with torch.no_grad():
                        for w, p in zip(worker.parameters(), params):
                            w.copy_(p.full_tensor())
                    worker.zero_grad()
                    loss = nn.functional.mse_loss(worker(x), y)
                    loss.backward()
                    for w, p in zip(worker.parameters(), params):
                        p.grad = distribute_tensor(w.grad, mesh, placements)
                    return loss

                opt_s.step(closure)
        train(ref, opt_r, data, 0, 1, 1.0)
        diffs = {}
        for i, (p, q) in enumerate(zip(params, ref.parameters())):
            diffs[str(i)] = float((p.detach().full_tensor() - q.detach()).norm() / q.detach().norm().clamp(min=1e-30))
        out[name] = {
            "max_rel_diff": max(diffs.values()),
            "rel_diffs": diffs,
            "replicated_bits": [bits(t) for t in rec.thresholds + rec.norms],
            "step_count": opt_s.step_count,
        }
        if keeps_state(cfg):
            out[name]["reuse_state"] = reuse_state(opt_s, params, opt_r, list(ref.parameters()))
    return out


def mask_checks(mesh):
    """The filter alone on the gradients of one backward: sharded mask vs unsharded mask."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    torch.manual_seed(7)
    shapes = [(64, 12), (64,), (48, 64), (3, 48), (3,), (1,), (200, 30)]
    fulls = [torch.randn(s) * (1 + i) + 0.1 * i for i, s in enumerate(shapes)]
    placements = mesh_placements(mesh)
    for name, cfg in CONFIGS.items():
        if cfg["cls"] is not ZSharp or "interval" in cfg or "fsdp" in cfg:
            continue
        direction = D.ZScoreDirection(cfg["percentile"], cfg.get("scope", "global"))
        adaptive = [cfg.get("adaptive", False)] * len(shapes)
        weights = [torch.randn(s) for s in shapes]
        ref_grads = [g.clone() for g in fulls]
        with Recorder() as ref_rec:
            direction(weights, ref_grads, adaptive=adaptive)
        segments = [g for g in fulls if g.dim() > 1] if direction.scope == "tensor" else fulls
        near = ties(segments, ref_rec.thresholds[0])
        dts = [distribute_tensor(g.clone(), mesh, placements) for g in fulls]
        dws = [distribute_tensor(w.clone(), mesh, placements) for w in weights]
        shards = zsharp_algos.sharding.shards_of(dws)
        grads_local = [zsharp_algos.sharding.local(g) for g in dts]
        with Recorder() as rec:
            norms = direction([zsharp_algos.sharding.local(w) for w in dws], grads_local, adaptive=adaptive, shards=shards).norms
        got = [full(g) for g in dts]  # the local shards were written in place
        differ = sum(int(((a != 0) != (b != 0)).sum()) for a, b in zip(got, ref_grads))
        out[name] = {
            "differ": differ,
            "entries": sum(g.numel() for g in fulls),
            "kept": sum(int((g != 0).sum()) for g in got),
            "near_threshold": near,
            "norms_bits": bits(norms) + [b for t in rec.thresholds for b in bits(t)],
            "values_max_rel": max(
                float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(got, ref_grads)
            ),
        }
    return out


def ties(segments, thresholds, rel=1e-5):
    """Entries whose |z| (float64, from scratch) lies within ``rel`` of their tensor's threshold:
    where a round-off difference in the mean or std may decide the mask either way."""
    count = 0
    for g, t in zip(segments, thresholds.double().tolist()):
        g = g.double().reshape(-1)
        if g.numel() < 2:
            continue
        z = ((g - g.mean()) / (g.std() + 1e-8)).abs()
        count += int(((z - t).abs() <= rel * (1 + t)).sum())
    return count


def mesh_placements(mesh):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate(), Shard(0)] if mesh.ndim == 2 else [Shard(0)]


def refusal_checks(mesh, world):
    """Layouts the optimizers refuse: the error (same on every rank, before any collective) and
    whether the weights are exactly as they were."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Partial, Shard, distribute_tensor

    out = {}
    x, y = batches(1)[0]

    def attempt(params, loss_fn):
        before = [full(p.detach()).clone() for p in params]
        opt = ZSharp(params, torch.optim.SGD, lr=0.1)

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        try:
            opt.step(closure)
            error = None
        except ValueError as err:
            error = str(err)
        same = all(torch.equal(full(p.detach()), b) for p, b in zip(params, before))
        return {"error": error, "weights_unchanged": same}

    # the layers sharded, the root not: its own parameters (scale) stay plain tensors
    model = make_model()
    for layer in (model.inp, model.hidden, model.head):
        fully_shard(layer, mesh=mesh)
    model.norm.weight.requires_grad_(False)
    model.norm.bias.requires_grad_(False)
    out["mixed"] = attempt([p for p in model.parameters() if p.requires_grad],
                           lambda: nn.functional.mse_loss(model(x), y))
    # tensor parallel style: sharded over two mesh dimensions
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    w = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh2, [Shard(0), Shard(1)]))
    out["two_shard_dims"] = attempt([w], lambda: (w * w).sum())
    # a Partial placement
    w = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)]))
    partial = torch.distributed.tensor.DTensor.from_local(torch.randn(8, 8), mesh, [Partial()])
    q = nn.Parameter(partial)
    out["partial"] = attempt([w, q], lambda: (w * w).sum() + (q * q).sum())
    return out


def resume_check(mesh, dp_rank, dp_size, tmp):
    """Per configuration of :data:`RESUME_CONFIGS`: k steps, save (DCP), fresh objects, load, the
    rest: bitwise equal to the uninterrupted run (weights; LookSAM's g_v where there is one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = {}
    data = batches(5)
    for name, cfg in RESUME_CONFIGS.items():
        checkpoint = os.path.join(tmp, name)
        model = shard(make_model(), mesh)
        opt = make_opt(cfg, model.parameters())
        train(model, opt, data, dp_rank, dp_size, 1.0)
        straight = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
        straight_gv = gathered_reuse_state(model, opt)

        model = shard(make_model(), mesh)
        opt = make_opt(cfg, model.parameters())
        train(model, opt, data[:3], dp_rank, dp_size, 1.0)
        saved_gv = len(gathered_reuse_state(model, opt))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=checkpoint)
        dist.barrier()

        model = shard(make_model(seed=99), mesh)  # other weights: the load must replace them
        opt = make_opt(cfg, model.parameters())
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        resumed_count = opt.step_count
        loaded_gv = len(gathered_reuse_state(model, opt))
        train(model, opt, data, dp_rank, dp_size, 1.0, start=3)
        equal = all(torch.equal(full(p.detach()), straight[n]) for n, p in model.named_parameters())
        resumed_gv = gathered_reuse_state(model, opt)
        out[name] = {"bitwise_equal": equal, "step_count_after_load": resumed_count, "step_count": opt.step_count,
                     "reuse_state_equal": resumed_gv.keys() == straight_gv.keys()
                     and all(torch.equal(resumed_gv[n], straight_gv[n]) for n in straight_gv)}
        if keeps_state(cfg):  # the tensors of our own state saved, and those the load put back
            out[name]["reuse_state_entries"] = {"saved": saved_gv, "loaded": loaded_gv}
    return out


def gathered_reuse_state(model, opt):
    """The optimizer's own state tensors per parameter name and key, gathered (empty without)."""
    return {f"{n}/{k}": full(v).clone() for n, p in model.named_parameters() for k, v in own_tensors(opt, p).items()}


def overflow_checks(mesh, dp_rank, dp_size):
    """fp16-style loss scaling (:class:`ClosureGradScaler`) under FSDP2: rank 0 puts an inf into
    the gradient of ``inp``'s first output, so after the reduce-scatter only rank 0's shard (the
    first rows) holds it. Per method and poisoned closure call (1: the first pass, 2: the second):
    whether this rank skipped the step, with the weights bitwise as they were and the scale backed
    off, and whether its own shard saw the inf (the agreement must come from a collective)."""
    out = {}
    data = batches(2)
    for method, cfg in (("sam", CONFIGS["sam"]), ("zsharp_global", CONFIGS["zsharp_global"])):
        for poison_call in (1, 2):
            model = shard(make_model(), mesh)
            opt = make_opt(cfg, model.parameters())
            scaler = ClosureGradScaler(init_scale=2.0**10)
            armed, calls = [False], [0]

            def poison(grad):
                grad = grad.clone()
                grad[:, 0] = float("inf")
                return grad

            def arm(module, args, output):
                if armed[0] and dp_rank == 0:
                    output.register_hook(poison)

            model.inp.register_forward_hook(arm)
            shard_saw_inf = [False]
            for step, (x, y) in enumerate(data):
                xs, ys = x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]

                def closure():
                    opt.zero_grad()
                    calls[0] += 1
                    armed[0] = step == 1 and calls[0] == poison_call
                    loss = nn.functional.mse_loss(model(xs), ys)
                    scaler.scale(loss).backward()
                    if armed[0]:
                        shard_saw_inf[0] = not bool(torch.isfinite(zsharp_algos.sharding.local(model.inp.weight.grad)).all())
                    return loss

                before = [full(p.detach()).clone() for p in model.parameters()]
                calls[0] = 0
                loss = scaler.step(opt, closure)
                scaler.update()
            out[f"{method}/call{poison_call}"] = {
                "skipped": scaler.skipped_steps, "step_count": opt.step_count, "returned_none": loss is None,
                "weights_unchanged": all(torch.equal(full(p.detach()), b) for p, b in zip(model.parameters(), before)),
                "scale": scaler.get_scale(), "shard_saw_inf": shard_saw_inf[0],
            }
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mesh", default="flat", choices=["flat", "2x2"])
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    if args.mesh == "2x2":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    dp_rank, dp_size = rank, world
    if args.mesh == "2x2":
        result = {"world": world, "mesh": [2, world // 2], "runs": run_configs_placed(mesh)}
    else:
        factor = gradient_factor(mesh)
        result = {"world": world, "factor": factor, "runs": run_configs(mesh, dp_rank, dp_size, factor)}
    result["masks"] = mask_checks(mesh)
    if args.resume:
        result["refusals"] = refusal_checks(mesh, world)
        result["resume"] = resume_check(mesh, dp_rank, dp_size, os.path.join(args.out, "ckpt"))
        result["overflow"] = overflow_checks(mesh, dp_rank, dp_size)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
