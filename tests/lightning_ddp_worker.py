"""One rank of a 2-process ``strategy="ddp"`` Lightning run (gloo on CPU), for tests/test_lightning.py.

``python tests/lightning_ddp_worker.py OUT_DIR`` starts rank 0; Lightning's launcher starts rank 1
by running the same command. Every rank trains :func:`bn_mlp` on its shard of :func:`ddp_data`
(examples ``rank, rank + 2, ...``) twice and saves its final weights, momentum buffers and logged metrics of each
run to ``OUT_DIR/rank{RANK}.pt``:

* ``"sam"``: :class:`SAMCallback` with ``accumulate_grad_batches=2``, 2 steps;
* ``"zsharp"``: :class:`ZSharpCallback` with ``interval=2``, 3 steps (plain and sharpness steps).

BatchNorm running statistics follow DDP's ``broadcast_buffers`` (rank 0's at the start of a step,
then each rank's own batches, as in any DDP run); parameters and optimizer state are global.
"""
from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

WORLD, BATCH, ACCUMULATE, STEPS, RHO, LR = 2, 4, 2, 2, 0.05, 0.1


def ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * BATCH * ACCUMULATE * STEPS, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def bn_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def main(out_dir: str) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from zsharp_algos.lightning import SAMCallback, ZSharpCallback

    warnings.filterwarnings("ignore")
    x, y = ddp_data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bn_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

        def train_dataloader(self):
            # rank r gets examples r, r + 2, r + 4, ... in order (the test's per-rank loop does the same)
            data = TensorDataset(x, y)
            world, rank = self.trainer.world_size, self.global_rank
            sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
            return DataLoader(data, batch_size=BATCH, sampler=sampler)

    runs = {
        "sam": dict(callbacks=[SAMCallback(rho=RHO)], accumulate_grad_batches=ACCUMULATE),
        "zsharp": dict(callbacks=[ZSharpCallback(rho=RHO, percentile=50, interval=2)], max_steps=STEPS + 1),
    }
    saved, rank = {}, 0
    for name, kwargs in runs.items():
        module = Module()
        trainer = pl.Trainer(
            **{"max_steps": STEPS, **kwargs}, accelerator="cpu", devices=WORLD, strategy="ddp", log_every_n_steps=1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False,
        )
        trainer.fit(module)
        opt = trainer.optimizers[0]
        rank = trainer.global_rank
        saved[name] = {
            "state": {k: v.clone() for k, v in module.net.state_dict().items()},
            "momentum": [opt.state[p]["momentum_buffer"].clone() for p in module.net.parameters()],
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "global_step": trainer.global_step,
        }
    torch.save(saved, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
