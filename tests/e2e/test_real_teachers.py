"""Every real teacher family through the one trainer: tiny fake checkpoints in the published layouts.

For each family: load from the fake files through the preset (paths overridden), train two steps of
Soft-Di[M]O with the preset's losses (GAN on real tokens where the preset has a GAN, a differentiable
reward through the soft decoder where it has rewards), check the checkpoint and that the student
moved while its input embedding did not, then run the teacher's own sampler for two steps.
"""
import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from orchestrator.config import load_config, to_dict
from softdimo.teachers import FAMILIES, load_teacher
from trainers.checkpoint import load_weights
from trainers.loop import train
from trainers.state import build_context

ROOT = Path(__file__).resolve().parents[2]
PRESET = {"amused": "amused_256", "maskgit": "maskgit", "maskbit": "maskbit", "maskgen": "maskgen_l",
          "meissonic": "meissonic"}
PROMPTS = ["a red circle", "a photo of a cat"]


def brightness(images, prompts):
    """A differentiable stand-in reward (the real scorers need staged weights)."""
    return images.mean(dim=(1, 2, 3))


def overrides(family: str, paths: dict, options: dict, teacher, tmp_path: Path) -> list:
    g = torch.Generator().manual_seed(0)
    n = 8
    stored = {"tokens": torch.randint(0, teacher.V, (n, teacher.seq_len), generator=g)}
    if teacher.conditioning == "class":
        stored["labels"] = torch.randint(0, teacher.num_classes, (n,), generator=g)
    save_file(stored, str(tmp_path / "tokens.safetensors"))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[i % 2] for i in range(n)) + "\n")
    unused = [f"teacher.paths.{k}=''" for k in FAMILIES[family].paths if k not in paths]
    out = [f"teacher.paths={{{', '.join(f'{k}: {v}' for k, v in paths.items())}}}", *unused,
           f"output_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=2", "train.grid_size=4",
           "train.device=cpu", "train.checkpoint_every=1", "train.warmup_steps=0", "gan.layers=[0, -1]",
           "gan.head_channels=8", "gan.start_step=1"]    # the GAN term reaches θ at step 2
    if options:
        out.append(f"teacher.options={{{', '.join(f'{k}: {v}' for k, v in options.items())}}}")
    out.append(f"data.tokens={tmp_path / 'tokens.safetensors'}")
    if teacher.conditioning == "text":
        out.append(f"data.captions={tmp_path / 'prompts.txt'}")
        # Di[M]O-loss prompts apart from the GAN's captions where the preset has them (MaskGen)
        # (the fakes' precomputed text features cover PROMPTS only: one of them, on its own)
        (tmp_path / "dimo_prompts.txt").write_text(PROMPTS[1] + "\n")
        out.append(f"data.prompts={tmp_path / 'dimo_prompts.txt'}")
    return out


@pytest.mark.parametrize("family", sorted(PRESET))
def test_two_training_steps_and_a_teacher_sample(family, tmp_path):
    fake = importlib.import_module(f"tests.fakes.{family}")
    paths, options = fake.write(tmp_path / "weights")
    teacher = load_teacher(family, paths, options, "cpu")
    cfg = load_config(ROOT / "sweeps/presets" / f"{PRESET[family]}.yaml",
                      overrides(family, paths, options, teacher, tmp_path))
    ctx = build_context(cfg, progress=False, reward_factory=lambda name, device: brightness)
    result = train(cfg, to_dict(cfg), ctx=ctx, progress=False)

    ckpt = Path(result.checkpoint)
    assert (ckpt / "meta.json").is_file() and ckpt.name.endswith("2")
    assert result.grid is not None and Path(result.grid).is_file()
    student, start = load_weights(ckpt, "generator"), teacher.backbone.state_dict()
    moved = [k for k in student if not torch.equal(student[k], start[k].float())]
    assert moved                                            # the blocks trained ...
    frozen = {name for name, p in teacher.make_student().named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(moved)              # ... the input embedding did not
    history = result.metrics
    assert all(torch.isfinite(torch.tensor(v)) for k, v in history.items() if k.startswith("loss/"))
    if cfg.gan.weight > 0:
        assert "loss/discriminator" in history
    if cfg.reward.weight > 0:
        assert "reward/imagereward" in history and "reward/clip" in history

    cond = (teacher.encode_condition(labels=torch.tensor([0, 1])) if teacher.conditioning == "class"
            else teacher.encode_condition(prompts=PROMPTS))
    g = torch.Generator().manual_seed(0)
    tokens = teacher.sample(cond, 2, teacher.sampling["cfg"], g)
    assert tokens.shape == (2, teacher.seq_len) and int(tokens.max()) < teacher.V
    images = teacher.decode_ids(tokens, cond)
    assert images.shape == (2, 3, teacher.image_size, teacher.image_size)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


@pytest.mark.parametrize("family", ["amused", "maskgen", "meissonic"])
def test_tteo_runs_through_each_text_teacher(family, tmp_path):
    """Best-of-2 with 2 TTEO iterations through the family's soft decoder (the generate --tteo path)."""
    from trainers.tteo import multistart_tteo

    fake = importlib.import_module(f"tests.fakes.{family}")
    teacher = load_teacher(family, *fake.write(tmp_path / "weights"), "cpu")
    net = teacher.make_student().eval()
    cond = teacher.encode_condition(prompts=PROMPTS)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = multistart_tteo(teacher, net, cond, PROMPTS, {"b": brightness}, {"b": 1.0}, {"b": 1.0},
                        bon=2, iters=2, lr=0.2, generator=torch.Generator().manual_seed(0))
    assert r.images.shape == (2, 3, teacher.image_size, teacher.image_size)
    assert torch.isfinite(r.trace["b"]).all() and len(r.trace["b"]) == 2
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
