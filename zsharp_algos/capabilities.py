"""What each entry point runs and refuses: one table, read by the integrations (to refuse a
combination before anything trains) and by the documentation (its table of refusals).

An entry point is a way into the library: the core optimizers in a loop of your own, Composer's
algorithms, the Hugging Face Trainer (two-pass, or the single-pass callbacks), the accelerate
helper, the Lightning callbacks. Each record says how many passes a sharpness step has there,
which set-ups it accepts and which it refuses with what way out. Options whose values need
both passes of a sharpness step (an update rule stepping with the first and the second pass's
gradients) are listed once, in :data:`NEEDS_TWO_PASSES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["EntryPoint", "ENTRY_POINTS", "NEEDS_TWO_PASSES", "entry_point"]

#: Option values an entry point with one pass a step cannot run, since they step with the
#: first pass's gradient and the second's together.
NEEDS_TWO_PASSES: dict[str, tuple[Any, ...]] = {
    "reuse": ("looksam",),
    "variant": ("friendly", "gsam"),  # their rules run with the base step, from the kept first pass
}


@dataclass(frozen=True)
class EntryPoint:
    """One entry point's capabilities.

    Attributes:
        name: its key in :data:`ENTRY_POINTS`.
        label: how the documentation names it.
        passes: forward/backward passes of a sharpness step: 2, or 1 for the single-pass HF
            callbacks (which perturb along the previous step's gradient).
        parallel: the data-parallel and sharded set-ups it runs.
        precision: the precisions it runs.
        refuses: the set-ups it refuses when it is set up, each with the way out.
    """

    name: str
    label: str
    passes: int
    parallel: str
    precision: str
    refuses: tuple[str, ...] = ()

    def check_options(self, owner: str, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the way out if ``options`` (every option of the optimizer,
        those its class fixes included) need what this entry point lacks."""
        if self.passes >= 2:
            return
        wanted = [f"{k}={v!r}" for k, v in options.items() if v in NEEDS_TWO_PASSES.get(k, ())]
        if wanted:
            raise ValueError(
                f"{owner} runs one forward/backward pass a step (along the previous step's gradient), and "
                f"{', '.join(wanted)} steps with both passes' gradients: use the two-pass Trainer "
                "(zsharp_algos.hf.Trainer with --optim, or the zsharp-hf launcher)"
            )


#: Every entry point's record by name (``core``, ``composer``, ``hf-trainer``, ``hf-callback``,
#: ``accelerate``, ``lightning``).
ENTRY_POINTS: dict[str, EntryPoint] = {
    e.name: e
    for e in (
        EntryPoint(
            "core", "SAM / ZSharp in your loop (step(closure), or first_step / second_step)", 2,
            "one process, DDP, FSDP2 (fully_shard, HSDP)", "fp32, bf16, fp16 (ClosureGradScaler)",
            ("FSDP1 (use FSDP2)", "FSDP2 CPU offload", "tensor parallelism", "sparse gradients",
             "ZSharp over tensors on several devices of one process"),
        ),
        EntryPoint(
            "composer", "Composer algorithms (SAMAlgorithm, ZSharpAlgorithm, ...)", 2,
            "one process, DDP, FSDP2 (FSDP2Config)", "fp32, amp_bf16, amp_fp16",
            ("FSDP1 (use FSDP2)", "tensor parallelism", "DeepSpeed", "XLA"),
        ),
        EntryPoint(
            "hf-trainer", "Hugging Face Trainer, --optim (zsharp_algos.hf.Trainer, zsharp-hf)", 2,
            "one process, DDP, FSDP2 (--fsdp)", "fp32, --bf16, --fp16",
            ("FSDP1 (use FSDP2)", "FSDP2 CPU offload", "FSDP on XLA", "DeepSpeed"),
        ),
        EntryPoint(
            "hf-callback", "Hugging Face single-pass callbacks (SAMCallback, ZSharpCallback)", 1,
            "one process, DDP", "fp32, --bf16, --fp16",
            ("any FSDP (use --optim with the two-pass Trainer)", "DeepSpeed",
             "what steps with both passes' gradients: reuse='looksam', FriendlySAM, GSAM",
             "the two-pass Trainer's --optim at the same time"),
        ),
        EntryPoint(
            "accelerate", "accelerate loops (TwoPassBackward)", 2,
            "one process, DDP, FSDP2 (fsdp_version: 2)", "no, bf16, fp16",
            ("FSDP1 (use FSDP2)", "FSDP2 CPU offload", "DeepSpeed", "Megatron-LM", "XLA"),
        ),
        EntryPoint(
            "lightning", "Lightning callbacks (SAMCallback, ZSharpCallback, ...) and LightningSAM / LightningZSharp", 2,
            "one device, ddp, ddp_spawn", "32-true, bf16-mixed, 16-mixed",
            ("FSDP and other sharded strategies", "DeepSpeed", "XLA", "manual optimization",
             "a core optimizer from configure_optimizers without the callback"),
        ),
    )
}


def entry_point(name: str) -> EntryPoint:
    """The record of entry point ``name`` (a key of :data:`ENTRY_POINTS`)."""
    return ENTRY_POINTS[name]
