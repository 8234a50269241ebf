"""sampa_fused.launch: the free port and the local rank launcher the CLI and
the benchmarks share."""
import socket
import subprocess
import sys

from sampa_fused.launch import free_port, rank_env, start_ranks


def test_free_port_can_be_bound():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_rank_env_is_torchruns_and_keeps_the_base():
    env = rank_env(1, 3, 12345, base={"KEEP": "x", "OMP_NUM_THREADS": "4"})
    assert env["KEEP"] == "x" and env["OMP_NUM_THREADS"] == "4"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("1", "1", "3", "3")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["GROUP_RANK"]) == ("127.0.0.1", "12345", "0")
    assert rank_env(0, 1, 1, base={})["OMP_NUM_THREADS"] == "1"


def test_start_ranks_runs_one_process_per_rank_on_one_port():
    code = "import os; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_PORT'])"
    procs = start_ranks([sys.executable, "-c", code], 3, env={"PATH": ""},
                        stdout=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sorted(o[0] for o in outs) == ["0", "1", "2"]
    assert {o[1] for o in outs} == {"3"} and len({o[2] for o in outs}) == 1
