"""The CUDA paths, on a GPU: device placement, bf16 autocast, CUDA generators, resume, memory, the
soft path, NCCL with one worker, and one full-size random teacher step (what the GPU suite times).

Every test is marked ``gpu`` and skipped where CUDA is absent (tests/conftest.py). Run them with
``python -m pytest -m gpu tests/gpu`` (benchmarks/gpu_suite.py does, as its first stage).
"""
import math
import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")


def _config(tmp_path, preset: str = "tiny_c2i.yaml", *extra: str):
    from orchestrator.config import load_config

    return load_config(ROOT / "sweeps/presets" / preset,
                       ["world.spec=test", "train.batch_size=8", "train.grid_size=4", "train.log_every=1",
                        f"output_dir={tmp_path}", "train.device=cuda", *extra])


def _train(cfg) -> list[dict]:
    from orchestrator.config import to_dict
    from trainers.loop import Hooks, train

    seen: list[dict] = []
    train(cfg, to_dict(cfg), hooks=Hooks(on_metrics=lambda step, m: seen.append(
        {k: float(v) for k, v in m.items() if k.startswith("loss/")})), progress=False)
    return [m for m in seen if m]


@pytest.fixture(scope="module")
def cuda_state(test_world, tmp_path_factory):
    """(cfg, ctx, st) of the c2i preset on the GPU, trainer defaults (precision auto)."""
    from trainers.state import build_context, build_state

    cfg = _config(tmp_path_factory.mktemp("cuda_state"))
    ctx = build_context(cfg, progress=False)
    return cfg, ctx, build_state(cfg, ctx)


def test_everything_trainable_and_frozen_lives_on_the_gpu(cuda_state):
    cfg, ctx, st = cuda_state
    assert ctx.device.type == "cuda" and st.rng.device.type == "cuda"
    for name, module in st.modules().items():
        devices = {p.device.type for p in module.parameters()} | {b.device.type for b in module.buffers()}
        assert devices == {"cuda"}, name
    assert ctx.data.tokens.is_cuda and ctx.data.labels.is_cuda
    assert ctx.teacher.embed_ids(torch.zeros(2, ctx.teacher.seq_len, dtype=torch.long, device=CUDA)).is_cuda


def test_auto_precision_is_bf16_autocast_with_fp32_weights(cuda_state):
    from trainers.steps import autocast, draw_student

    cfg, ctx, st = cuda_state
    assert cfg.train.precision == "auto"
    cond = ctx.condition(torch.arange(4, device=CUDA) % ctx.teacher.num_classes, [""] * 4)
    with autocast(ctx, cfg):
        z = draw_student(cfg, ctx, st.generator, cond, torch.Generator(CUDA).manual_seed(0))
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()
    assert all(p.dtype == torch.float32 for p in st.generator.parameters())


def test_a_cuda_train_step_gives_finite_losses_and_moves_the_weights(cuda_state):
    from trainers.steps import train_step

    cfg, ctx, st = cuda_state
    before = [p.detach().clone() for p in st.generator.parameters() if p.requires_grad]
    metrics = train_step(cfg, ctx, st)
    assert {"loss/dimo", "loss/auxiliary", "loss/gan_generator", "loss/discriminator"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    after = [p.detach() for p in st.generator.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_cuda_generators_draw_the_same_masks_for_the_same_seed(cuda_state):
    from softdimo.math import masking

    _, ctx, _ = cuda_state
    t = ctx.teacher

    def draw(seed):
        g = torch.Generator(CUDA).manual_seed(seed)
        return masking.sample_init(16, t.seq_len, t.V, t.mask_id, 0.6, g, device=CUDA)

    a, b, c = draw(3), draw(3), draw(4)
    assert a.is_cuda and torch.equal(a, b) and not torch.equal(a, c)
    assert (a == t.mask_id).float().mean().item() == pytest.approx(0.6, abs=0.1)


def test_the_soft_path_matches_the_hard_path_on_cuda(cuda_state):
    _, ctx, _ = cuda_state
    t = ctx.teacher
    g = torch.Generator(CUDA).manual_seed(0)
    ids = torch.randint(0, t.V, (4, t.seq_len), generator=g, device=CUDA)
    one_hot = torch.nn.functional.one_hot(ids, t.V).float()
    assert torch.allclose(t.embed_probs(one_hot), t.embed_ids(ids), atol=1e-5)
    cond = t.encode_condition(labels=torch.arange(4, device=CUDA) % t.num_classes)
    with torch.no_grad():
        assert torch.allclose(t.decode_probs(one_hot, cond), t.decode_ids(ids, cond), atol=1e-4)


def test_cuda_forward_agrees_with_the_cpu(cuda_state):
    import copy

    _, ctx, _ = cuda_state
    gpu_t = ctx.teacher
    cpu_t = copy.deepcopy(gpu_t).to("cpu")
    ids = torch.randint(0, gpu_t.V, (2, gpu_t.seq_len), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1])
    with torch.no_grad():          # fp32 on both (no autocast): TF32 matmuls at most
        gpu = gpu_t.forward_embeddings(gpu_t.backbone, gpu_t.embed_ids(ids.to(CUDA)),
                                       gpu_t.encode_condition(labels=labels.to(CUDA)))[0]
        cpu = cpu_t.forward_embeddings(cpu_t.backbone, cpu_t.embed_ids(ids),
                                       cpu_t.encode_condition(labels=labels))[0]
    assert gpu.dtype == cpu.dtype == torch.float32
    assert torch.allclose(gpu.cpu(), cpu, atol=5e-3, rtol=1e-3)


def test_resume_on_cuda_continues_where_the_run_stopped(test_world, tmp_path):
    straight = _train(_config(tmp_path / "a", "tiny_c2i.yaml", "train.steps=3", "train.checkpoint_every=1"))
    _train(_config(tmp_path / "b", "tiny_c2i.yaml", "train.steps=2", "train.checkpoint_every=1"))
    from orchestrator.config import to_dict
    from trainers.loop import Hooks, train

    cfg = _config(tmp_path / "b", "tiny_c2i.yaml", "train.steps=3", "train.checkpoint_every=1")
    seen: list[dict] = []
    result = train(cfg, to_dict(cfg), resume=True, progress=False,
                   hooks=Hooks(on_metrics=lambda s, m: seen.append({k: float(v) for k, v in m.items()
                                                                   if k.startswith("loss/")})))
    resumed = [m for m in seen if m]
    assert result.step == 3 and len(resumed) == 1          # only step 3 ran again
    # GPU kernels need not be bitwise reproducible; the same data, masks and weights give the
    # same losses to bf16 precision
    for key, value in straight[-1].items():
        assert resumed[0][key] == pytest.approx(value, rel=2e-2, abs=1e-5), key


def test_step_memory_is_bounded_and_released(test_world, tmp_path):
    import gc

    from trainers.state import build_context, build_state
    from trainers.steps import train_step

    cfg = _config(tmp_path)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    ctx = build_context(cfg, progress=False)
    st = build_state(cfg, ctx)
    torch.cuda.reset_peak_memory_stats()
    train_step(cfg, ctx, st)
    peak = torch.cuda.max_memory_allocated()
    assert 0 < peak < 4 * 2 ** 30                       # the test world is tiny: well under 4 GiB
    del st, ctx
    gc.collect()
    torch.cuda.empty_cache()
    # the world stays cached in the process (test_world); what one run adds must go away
    assert torch.cuda.memory_allocated() - base < 64 * 2 ** 20


def test_a_full_size_random_teacher_step_runs_in_bf16(tmp_path):
    """What the GPU suite measures, at batch 2: MaskGit v1 at its published size, joint step."""
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.step_bench import family_pair

    row = family_pair("maskgit", "full", CUDA, batch=2, steps=1, warmup=1)
    for key in ("dimo_only", "joint"):
        v = row[key]
        assert v["fits"] and v["precision"] == "bf16" and v["seconds_per_step"] > 0
        assert v["flops_per_step"] > 0 and v["peak_memory_bytes"] > 0
    assert row["teacher_params"] == pytest.approx(174e6, rel=0.02)
    assert row["flop_ratio"] > 1.0                       # GAN heads and the discriminator cost FLOPs


# last in the file: if NCCL's init hangs in a sandbox, the tests before it have already run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_with_one_worker_runs_the_collectives_and_a_step(cuda_state):
    import torch.distributed as torch_dist

    from trainers import distributed as dist
    from trainers.steps import train_step

    if not torch_dist.is_nccl_available():
        pytest.fail("this CUDA build of torch has no NCCL")
    cfg, ctx, st = cuda_state
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch_dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        assert torch_dist.get_backend() == "nccl" and dist.world_size() == 1 and dist.is_main()
        t = torch.arange(6, dtype=torch.float32, device=CUDA)
        dist._all_reduce_mean_([t])                      # the gradient all-reduce, for real
        torch.cuda.synchronize()
        assert torch.equal(t, torch.arange(6, dtype=torch.float32, device=CUDA))
        gathered = [torch.empty(2, device=CUDA)]
        torch_dist.all_gather(gathered, torch.tensor([1.0, 2.0], device=CUDA))
        assert gathered[0].tolist() == [1.0, 2.0]
        assert dist.rank_seed(cfg.seed) == cfg.seed       # rank 0 keeps the config's seed
        metrics = train_step(cfg, ctx, st)
        assert all(math.isfinite(v) for v in metrics.values())
    finally:
        torch_dist.destroy_process_group()
