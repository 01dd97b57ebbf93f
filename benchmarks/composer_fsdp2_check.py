"""A short Composer FSDP2 run with ZSharpAlgorithm and SAMAlgorithm, checked; prints PASS or FAIL.

    python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/composer_fsdp2_check.py --device gpu
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/composer_fsdp2_check.py --device cpu

Every rank trains a small MLP with Composer's Trainer under
``parallelism_config={"fsdp": FSDP2Config()}`` for a few batches (fp32, and amp_bf16 on a GPU that
supports it), then checks: the optimizer is ours and steps DTensor parameters, it took every
step, its work buffer holds the local shard only, and (fp32) the weights equal the core optimizer
run unsharded on the same global batches (relative 1e-5; on gloo the reduce-scattered gradients
are summed rather than averaged, a factor measured first and applied to the reference's loss).
Exit code 0 and ``PASS`` on rank 0 when every check holds, else ``FAIL`` with the reasons.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="gpu", help="gpu or cpu (Composer's device names)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from composer import Trainer
    from composer.models import ComposerClassifier
    from composer.utils import dist
    from composer.utils.parallelism import FSDP2Config
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from zsharp_algos import SAM, ZSharp
    from zsharp_algos.composer import SAMAlgorithm, ZSharpAlgorithm

    warnings.filterwarnings("ignore", message="FSDP2 Config/APIs are experimental")
    torch.backends.cuda.matmul.allow_tf32 = False
    dist.initialize_dist(args.device)
    world, rank = dist.get_world_size(), dist.get_global_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "gpu" else torch.device("cpu")
    per_rank, classes = 8, 5

    def mlp():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    gen = torch.Generator().manual_seed(0)
    n = args.steps * per_rank * world
    x, y = torch.randn(n, 32, generator=gen), torch.randint(0, classes, (n,), generator=gen)

    # the factor FSDP2 leaves on reduce-scattered gradients here (gloo in torch 2.7 sums them)
    from torch.distributed.fsdp import fully_shard

    probe, ref = nn.Linear(4, 4).to(device), nn.Linear(4, 4).to(device)
    probe.load_state_dict(ref.state_dict())
    fully_shard(probe)
    px = torch.randn(2 * world, 4, generator=torch.Generator().manual_seed(3)).to(device)
    probe(px.chunk(world)[rank]).square().mean().backward()
    ref(px).square().mean().backward()
    factor = float(round(float(probe.weight.grad.full_tensor().norm() / ref.weight.grad.norm())))

    precisions = ["fp32"]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        precisions.append("amp_bf16")
    failures = []
    for precision in precisions:
        for algorithm_cls, optimizer_cls, kwargs in (
            (ZSharpAlgorithm, ZSharp, dict(rho=0.05, percentile=70)),
            (SAMAlgorithm, SAM, dict(rho=0.05, interval=2)),
        ):
            name = f"{algorithm_cls.__name__}/{precision}"
            try:
                dataset = TensorDataset(x, y)
                loader = DataLoader(dataset, batch_size=per_rank, sampler=dist.get_sampler(dataset, shuffle=False))
                model = mlp()
                trainer = Trainer(
                    model=ComposerClassifier(model, num_classes=classes), train_dataloader=loader,
                    optimizers=sgd(model.parameters()), max_duration=f"{args.steps}ba",
                    algorithms=[algorithm_cls(**kwargs)], parallelism_config={"fsdp": FSDP2Config()},
                    device=args.device, precision=precision, progress_bar=False, log_to_console=False, seed=0,
                )
                trainer.fit()
                opt = trainer.state.optimizers[0]
                params = [p for g in opt.param_groups for p in g["params"]]
                local = sum(p.to_local().numel() * p.element_size() for p in params)
                if not hasattr(opt, "engine"):
                    failures.append(f"{name}: the trainer's optimizer is {type(opt).__name__}")
                    continue
                if not all(hasattr(p, "to_local") for p in params):
                    failures.append(f"{name}: parameters are not DTensors")
                if opt.step_count != args.steps:
                    failures.append(f"{name}: {opt.step_count} steps, expected {args.steps}")
                if opt.engine.placement.buffer.nbytes != local:
                    failures.append(f"{name}: work buffer {opt.engine.placement.buffer.nbytes} B, local shard {local} B")
                full = [p.detach().full_tensor() for p in model.parameters()]
                if precision == "fp32":
                    reference = mlp().to(device)
                    ropt = optimizer_cls(sgd(reference.parameters()), model=reference, **kwargs)
                    size = per_rank * world
                    for i in range(args.steps):
                        xb, yb = x[i * size:(i + 1) * size].to(device), y[i * size:(i + 1) * size].to(device)

                        def closure():
                            ropt.zero_grad()
                            loss = F.cross_entropy(reference(xb), yb) * factor
                            loss.backward()
                            return loss

                        ropt.step(closure)
                    diff = max(float((w - q.detach()).norm() / q.detach().norm()) for w, q in zip(full, reference.parameters()))
                    if not diff <= 1e-5:
                        failures.append(f"{name}: weights differ from the unsharded run by {diff:.3g} (relative)")
                elif not all(bool(torch.isfinite(w).all()) for w in full):
                    failures.append(f"{name}: non-finite weights")
                trainer.close()
            except Exception as exc:  # reported, the other runs still go
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
    if rank == 0:
        what = f"Composer FSDP2, {world} rank(s) on {args.device}, {', '.join(precisions)}"
        if failures:
            print(f"FAIL {what}:\n  " + "\n  ".join(failures))
        else:
            print(f"PASS {what}: ZSharp and SAM step the shards, buffer = local shard, fp32 = unsharded run")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
