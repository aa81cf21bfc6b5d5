"""Multi-node, really started: two torchrun agents (``--nnodes 2 --nproc_per_node 1``) meet
through a c10d rendezvous on 127.0.0.1 and train the weights one process trains with the same
global batch."""
import os
import subprocess
import sys

import pytest
import torch

from .conftest import PRETRAIN_RUN, ROOT, assert_same_tensors, free_port, output_of, run_cli



def _agent(node_rank: int, port: int, sets: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=star-mamba-test", "--max_restarts=0", "-m", "star_mamba", "pretrain",
               *(f"--set={s}" for s in sets)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_torchrun_agents_train_the_weights_of_one_process(tmp_path):
    base = [*PRETRAIN_RUN, "optim.epochs=1", "optim.blr=1e-2", "run.max_steps=3"]
    one = run_cli("pretrain", [*base, "optim.batch_size=16", f"run.output_dir={tmp_path / 'one'}"],
                  "--nproc_per_node=1")
    assert one.returncode == 0, output_of(one)
    port = free_port()
    sets = [*base, "optim.batch_size=8", f"run.output_dir={tmp_path / 'two'}"]
    agents = [_agent(rank, port, sets) for rank in (0, 1)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, (out[-2000:], err[-3000:])
    load = lambda name: torch.load(tmp_path / name / "checkpoint-latest.pth",  # noqa: E731
                                   weights_only=True)
    a, b = load("one"), load("two")
    assert a["state"]["step"] == b["state"]["step"] == 3
    # atol 1e-5 (an lr of 6e-4 moves weights by ~1e-3 a step): the attention's key bias has a
    # zero gradient up to rounding (softmax ignores it), which AdamW normalises into noise
    assert_same_tensors(a["model"], b["model"], "weights", rtol=1e-4, atol=1e-5)
    assert "2 process(es)" in (tmp_path / "two" / "log.txt").read_text()
