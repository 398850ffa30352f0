"""trainers.distributed over a real 2-process gloo group (no Ray): the DDP arithmetic by hand."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from trainers import distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)              # different initial weights on each rank
        net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        frozen = nn.Linear(2, 2).requires_grad_(False)
        dist.broadcast_module(net)
        after_broadcast = [p.detach().clone() for p in net.parameters()]
        x = torch.full((5, 3), float(rank + 1))    # different data on each rank
        net(x).pow(2).sum().backward()
        local = [p.grad.clone() for p in net.parameters()]
        net[1].bias.grad = None                    # a parameter without a gradient on this rank
        dist.average_gradients(net)
        dist.average_gradients(frozen)             # nothing trainable: a no-op
        gathered = dist.gather_tensors(torch.tensor([float(rank)]))
        result = {
            "rank_seed": dist.rank_seed(7),
            "params": [p.tolist() for p in after_broadcast],
            "local_grads": [g.tolist() for g in local],
            "avg_grads": [p.grad.tolist() for p in net.parameters()],
            "metrics": dist.mean_metrics({"a": float(rank), "b": 2.0 * rank}, torch.device("cpu")),
            "any_true": dist.any_rank(rank == 1, torch.device("cpu")),
            "any_false": dist.any_rank(False, torch.device("cpu")),
            "spread_equal": dist.max_parameter_spread([net], torch.device("cpu")),
            "gathered": [t.item() for t in gathered],
        }
        with torch.no_grad():
            net[0].weight[0, 0] += rank * 0.5
        result["spread_after"] = dist.max_parameter_spread([net], torch.device("cpu"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_single_process_is_identity():
    net = nn.Linear(2, 2)
    net(torch.ones(1, 2)).sum().backward()
    before = net.weight.grad.clone()
    dist.average_gradients(net)
    assert torch.equal(net.weight.grad, before)
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.mean_metrics({"x": 3.0}, torch.device("cpu")) == {"x": 3.0}
    assert dist.rank_seed(5) == 5


def test_broadcast_makes_parameters_equal(two_ranks):
    assert two_ranks[0]["params"] == two_ranks[1]["params"]


def test_gradients_are_the_rank_mean(two_ranks):
    r0, r1 = two_ranks
    assert r0["local_grads"] != r1["local_grads"]          # the data differed
    for i, (g0, g1) in enumerate(zip(r0["local_grads"], r1["local_grads"])):
        expected = (torch.tensor(g0) + torch.tensor(g1)) / 2
        if i == 3:   # rank 0 and 1 both dropped this gradient: zeros were averaged
            expected = torch.zeros_like(expected)
        torch.testing.assert_close(torch.tensor(r0["avg_grads"][i]), expected)
        assert r0["avg_grads"][i] == r1["avg_grads"][i]


def test_metrics_flags_spread_and_gather(two_ranks):
    for r in two_ranks:
        assert r["metrics"] == {"a": 0.5, "b": 1.0}
        assert r["any_true"] is True and r["any_false"] is False
        assert r["spread_equal"] == 0.0
        assert r["spread_after"] == pytest.approx(0.5)
        assert r["gathered"] == [0.0, 1.0]
    assert two_ranks[0]["rank_seed"] == 7 and two_ranks[1]["rank_seed"] == 7 + dist.RANK_SEED_STRIDE
