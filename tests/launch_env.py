"""The environment for launching worker processes from the tests.

In-process launches earlier in the suite (Lightning's and Composer's DDP set-up, accelerate's
state) write launcher variables into ``os.environ``; a process launched after them with those
would take itself for one rank of an old job. ``clean_env()`` drops them; ``free_port()`` gives a
rendezvous port nobody holds."""
from __future__ import annotations

import os
import re
import socket

LAUNCHER_VARIABLES = re.compile(
    r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|NODE_RANK|GROUP_RANK|ROLE_RANK|MASTER_ADDR|MASTER_PORT"
    r"|TORCHELASTIC_\w+|PL_\w+|ACCELERATE_\w+|COMPOSER_\w+|TORCH_NCCL_\w+|FSDP_\w+)$"
)


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without the launcher variables, one thread per process, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not LAUNCHER_VARIABLES.match(k)}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> str:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it), as the string launchers take."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
