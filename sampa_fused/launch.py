"""Ranks on this machine, for the sampa-train CLI and the benchmarks: a free
port for the rendezvous, and N copies of a command under the environment
variables torchrun sets (so each rank runs exactly the code torchrun would
run)."""
from __future__ import annotations

import os
import socket
import subprocess
from typing import Dict, List, Optional, Sequence


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """`base` (default os.environ) plus torchrun's variables for one local rank."""
    env = dict(os.environ if base is None else base, RANK=str(rank), LOCAL_RANK=str(rank),
               WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", "1")     # as torchrun does
    return env


def start_ranks(argv: Sequence[str], world_size: int, env: Optional[Dict[str, str]] = None,
                **popen_kwargs) -> List[subprocess.Popen]:
    """Start `world_size` processes of `argv`, one per rank, meeting on one free port."""
    port = free_port()
    return [subprocess.Popen(list(argv), env=rank_env(r, world_size, port, env), **popen_kwargs)
            for r in range(world_size)]
