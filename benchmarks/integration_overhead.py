"""What each framework's glue adds to a sharpness-aware step, against the core ``step(closure)``.

On the same timm resnet18 batch, in one process, each unit takes ``--steps`` ZSharp steps:

* ``core``: ``ZSharp.step(closure)``, the reference;
* ``composer``: ``ComposerZSharp.step`` driving a closure that takes Composer's ``ddp_sync`` /
  ``loss_dict`` keywords (the algorithm's optimizer, as the Trainer calls it);
* ``two_pass``: ``two_pass_backward`` + ``step()``, the Hugging Face Trainer's path;
* ``accelerate``: ``TwoPassBackward.backward`` + the prepared optimizer's ``step()`` (accelerate's
  ``Accelerator(cpu=True)``).

Statistics are recorded on every sharpness step in each (the default), so logging costs are in.
Writes ``OUT/integration_overhead.json`` and prints each unit's median step time and its ratio to
``core``. The frameworks' own loops (data loading, callbacks, loggers) are not timed: they cost
the same with any optimizer.

    python benchmarks/integration_overhead.py --threads 2
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from common import base_parser, interleaved_medians, machine, print_table, setup, write_json
from dispatch_count import DispatchCount

from zsharp_algos import ZSharp
from zsharp_algos.two_pass import two_pass_backward


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed unit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    device = setup(args)
    import timm

    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=10).to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def fresh(kind=ZSharp):
        model = copy.deepcopy(base)
        return model, kind(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model=model)

    units = {}

    model, opt = fresh()

    def core():
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(args.steps):
            opt.step(closure)
        return args.steps

    units["core"] = core

    from zsharp_algos.composer.optimizer import ComposerZSharp

    c_model, c_opt = fresh(ComposerZSharp)

    def composer():
        def trainer_closure(ddp_sync=True, loss_dict=None):
            c_opt.zero_grad()
            loss = F.cross_entropy(c_model(x), y)
            loss.backward()
            return loss

        for _ in range(args.steps):
            c_opt.step(trainer_closure)
        return args.steps

    units["composer"] = composer

    t_model, t_opt = fresh()

    def two_pass():
        def run_pass():
            loss = F.cross_entropy(t_model(x), y)
            loss.backward()
            return loss.detach()

        for _ in range(args.steps):
            two_pass_backward(t_opt, run_pass, t_model)
            t_opt.step()
            t_opt.zero_grad()
        return args.steps

    units["two_pass"] = two_pass

    try:
        from accelerate import Accelerator

        from zsharp_algos.accelerate_loop import TwoPassBackward
    except ImportError:
        Accelerator = None
    if Accelerator is not None:
        accelerator = Accelerator(cpu=device.type == "cpu")
        a_model, a_opt = fresh()
        sharp = TwoPassBackward(accelerator, a_opt)
        a_model, prepared = accelerator.prepare(a_model, sharp.optimizer)

        def accel():
            for _ in range(args.steps):
                sharp.backward(a_model, lambda: F.cross_entropy(a_model(x), y))
                prepared.step()
                prepared.zero_grad()
            return args.steps

        units["accelerate"] = accel

    seconds = interleaved_medians(units, args.rounds, args.warmup, device)
    # The deterministic part of the overhead: torch ops dispatched per step (forward and
    # backward included), which is what a GPU pays per launch; the times above carry the
    # machine's noise (several percent between runs on two shared cores).
    ops = {}
    for name, unit in units.items():
        with DispatchCount() as mode:
            steps = unit()
        ops[name] = mode.total / steps
    rows = [[name, f"{s * 1e3:.1f}", f"{s / seconds['core']:.3f}", f"{ops[name]:.0f}", f"{ops[name] - ops['core']:+.0f}"]
            for name, s in seconds.items()]
    print_table("ZSharp step through each integration (resnet18)",
                ["path", "ms/step", "vs core", "ops/step", "ops vs core"], rows)
    write_json(args.out, "integration_overhead", {
        "machine": machine(device), "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
        "seconds_per_step": seconds, "ratio_to_core": {n: s / seconds["core"] for n, s in seconds.items()},
        "ops_per_step": ops, "extra_ops_vs_core": {n: o - ops["core"] for n, o in ops.items()},
    })


if __name__ == "__main__":
    main()
