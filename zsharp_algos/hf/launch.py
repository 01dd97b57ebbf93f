"""``zsharp-hf``: run an unmodified Hugging Face Trainer script with ``--optim sam/zsharp``.

Usage (in the spirit of ``torchrun`` / ``accelerate launch``)::

    zsharp-hf train.py --output_dir out --optim zsharp --base_optim sgd --rho 0.05 ...
    zsharp-hf -m my_package.train --optim sam ...
    torchrun --nproc_per_node 2 -m zsharp_algos.hf train.py --optim zsharp ...
    accelerate launch --multi_gpu --num_processes 2 -m zsharp_algos.hf train.py --optim zsharp ...

(On a machine without GPUs add the script flag ``--use_cpu`` so that transformers sets up gloo DDP.)

Before the script runs, the launcher puts the sharpness-aware classes of :mod:`zsharp_algos.hf`
in place of transformers' ``TrainingArguments``, ``Trainer``, ``Seq2SeqTrainingArguments`` and
``Seq2SeqTrainer`` (in ``transformers`` as ``sys.modules`` holds it, and in the modules that
define them), in this process only; then it runs the script as ``__main__`` with ``runpy``, with
``sys.argv`` and ``sys.path[0]`` set as ``python SCRIPT.py`` would. Scripts that import those
names from ``transformers`` (directly or through subclasses they define) get ``--optim sam``,
``--optim zsharp``, their flags (``--base_optim --rho --percentile --scope --interval
--interval_mode --reuse --reuse_alpha --adaptive --perturb_eps``) and true two-pass steps; without
those flags the script runs as it always did.
"""
from __future__ import annotations

import os
import runpy
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

__all__ = ["main", "patched_transformers", "PATCHES"]

USAGE = """usage: zsharp-hf [-h] (SCRIPT.py | -m MODULE) [script arguments ...]

Run a Hugging Face Trainer script with --optim sam / --optim zsharp available
(two-pass sharpness-aware training). Extra script flags with --optim sam/zsharp:
  --base_optim NAME   base optimizer, any transformers --optim value (default adamw_torch)
  --rho R             perturbation radius (default 0.05)
  --percentile P      zsharp: |z| percentile cut (default 70)
  --scope S           zsharp: global | tensor (default global)
  --interval K        a sharpness step every K optimizer steps (default 1)
  --interval_mode M   fixed | random (each step one with probability 1/K; default fixed)
  --reuse R           none | looksam (steps between sharpness steps reuse its gradient; default none)
  --reuse_alpha A     reuse=looksam: the reused part's weight (default 0.7)
  --adaptive          ASAM scaling by |w|
  --perturb_eps E     added to the norm that divides rho (default 1e-12)
Several processes: torchrun --nproc_per_node N -m zsharp_algos.hf SCRIPT.py ...
               or: accelerate launch --multi_gpu --num_processes N -m zsharp_algos.hf SCRIPT.py ...
(no GPU: add --use_cpu to the script arguments for gloo DDP)"""

#: (module, attribute) pairs the launcher replaces by ``zsharp_algos.hf.<attribute>``.
PATCHES = (
    ("transformers", "TrainingArguments"),
    ("transformers.training_args", "TrainingArguments"),
    ("transformers", "Seq2SeqTrainingArguments"),
    ("transformers.training_args_seq2seq", "Seq2SeqTrainingArguments"),
    ("transformers", "Trainer"),
    ("transformers.trainer", "Trainer"),
    ("transformers", "Seq2SeqTrainer"),
    ("transformers.trainer_seq2seq", "Seq2SeqTrainer"),
)


@contextmanager
def patched_transformers() -> Iterator[None]:
    """Within the block, transformers' argument and trainer classes are the sharpness-aware
    ones of :mod:`zsharp_algos.hf`; the originals are put back on exit."""
    import importlib

    from .. import hf

    saved = []
    try:
        for module_name, name in PATCHES:
            module = importlib.import_module(module_name)
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, getattr(hf, name))
        yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


def _parse(argv: Sequence[str]) -> tuple[str, str, list[str]] | None:
    """``(kind, target, script_args)`` with kind ``"path"`` or ``"module"``; None for help."""
    if not argv or argv[0] in ("-h", "--help"):
        return None
    if argv[0] in ("-m", "--module"):
        if len(argv) < 2:
            raise SystemExit("zsharp-hf: -m needs a module name\n" + USAGE)
        return "module", argv[1], list(argv[2:])
    if argv[0].startswith("-"):
        raise SystemExit(f"zsharp-hf: unknown option {argv[0]!r} (options go after the script)\n" + USAGE)
    return "path", argv[0], list(argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``zsharp-hf`` and ``python -m zsharp_algos.hf``."""
    parsed = _parse(list(sys.argv[1:] if argv is None else argv))
    if parsed is None:
        print(USAGE)
        return 0
    kind, target, script_args = parsed
    if kind == "path" and not os.path.isfile(target):
        raise SystemExit(f"zsharp-hf: no such script: {target!r}")
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    with patched_transformers():
        try:
            if kind == "path":
                sys.argv = [target, *script_args]
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
            else:
                sys.argv = [target, *script_args]
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        finally:
            sys.argv = saved_argv
            if kind == "path" and sys.path and sys.path[0] != saved_path0:
                sys.path.pop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
