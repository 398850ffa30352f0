"""The options the paper's real runs need, each against the text it comes from (issue 11).

Every test runs the real preset of a family on its tiny fake checkpoint (tests/fakes) with only the
sizes overridden, so what is checked is the preset's recipe through the one trainer.
"""
import importlib
from pathlib import Path

import pytest
import torch

from orchestrator.config import UserError, load_config
from softdimo.teachers import load_teacher
from tests.e2e.test_real_teachers import PRESET, PROMPTS, brightness, overrides
from trainers import steps
from trainers.config import ConfigValueError
from trainers.discriminator import DiscriminatorHeads
from trainers.state import build_context, build_state

ROOT = Path(__file__).resolve().parents[2]


def fake_run(family: str, tmp_path: Path, extra: list = ()):
    """(cfg, ctx, state) of ``family``'s preset on its fake checkpoint."""
    fake = importlib.import_module(f"tests.fakes.{family}")
    paths, options = fake.write(tmp_path / "weights")
    teacher = load_teacher(family, paths, options, "cpu")
    cfg = load_config(ROOT / "sweeps/presets" / f"{PRESET[family]}.yaml",
                      overrides(family, paths, options, teacher, tmp_path) + list(extra))
    ctx = build_context(cfg, progress=False, reward_factory=lambda name, device: brightness)
    return cfg, ctx, build_state(cfg, ctx)


def spy_nets(ctx, st) -> dict:
    """Record ``net.training`` of every forward_embeddings call, per network."""
    seen = {"teacher": [], "aux": [], "generator": []}
    forward = ctx.teacher.forward_embeddings
    names = {id(ctx.teacher.backbone): "teacher", id(st.auxiliary): "aux", id(st.generator): "generator"}

    def spy(net, e, cond, layers=()):
        if id(net) in names and not layers:     # layers: the discriminator's feature pass
            seen[names[id(net)]].append(net.training)
        return forward(net, e, cond, layers)
    ctx.teacher.forward_embeddings = spy
    return seen


def test_discriminator_trains_before_the_gan_term_reaches_the_generator(tmp_path):
    """Fig. 9/12: "The GAN loss is not applied to the generator for the first 1000 steps"; η trains."""
    cfg, ctx, st = fake_run("maskgit", tmp_path, ["gan.start_step=2", "gan.discriminator_start_step=0"])
    first = steps.train_step(cfg, ctx, st)
    assert "loss/discriminator" in first and "loss/gan_generator" not in first
    st.step = 2
    later = steps.train_step(cfg, ctx, st)
    assert "loss/discriminator" in later and "loss/gan_generator" in later
    preset = load_config(ROOT / "sweeps/presets/maskgit.yaml", _staged(tmp_path, "maskgit"))
    assert (preset.gan.start_step, preset.gan.discriminator_start_step) == (1000, 0)


# Table 5: "# Discriminator Heads" and "Total #params in Discriminator"; the teachers' hidden width
# and token layout (teachers.md): MaskGit 768 on 16×16, MaskBit 1024 on 16×16, MaskGen-L 1024 on 128 (1-D).
TABLE5_HEADS = {"maskgit": (4, 72e6, 768, 256), "maskbit": (4, 85e6, 1024, 256),
                "maskgen_l": (6, 65e6, 1024, 128)}


@pytest.mark.parametrize("preset", TABLE5_HEADS)
def test_discriminator_size_matches_table_5(preset, tmp_path):
    heads, params, width, length = TABLE5_HEADS[preset]
    cfg = load_config(ROOT / "sweeps/presets" / f"{preset}.yaml", _staged(tmp_path, preset))
    with torch.device("meta"):       # full size, no memory
        eta = DiscriminatorHeads(width, length, cfg.gan.layers, cfg.gan.head_channels, cfg.gan.head_depth)
    count = sum(p.numel() for p in eta.parameters())
    assert len(cfg.gan.layers) == heads and abs(count - params) / params < 0.03, count


def test_dimo_weight_zero_runs_no_teacher_and_no_auxiliary(tmp_path):
    """Sec. 4.3 / Table 10: Meissonic trained with the reward alone (no Di[M]O loss)."""
    cfg, ctx, st = fake_run("meissonic", tmp_path, ["dimo.weight=0"])
    calls = spy_nets(ctx, st)
    aux_before = {k: v.clone() for k, v in st.auxiliary.state_dict().items()}
    gen_before = {k: v.clone() for k, v in st.generator.state_dict().items()}
    metrics = steps.train_step(cfg, ctx, st)
    assert calls["generator"] and not calls["teacher"] and not calls["aux"]
    assert "loss/dimo" not in metrics and "loss/auxiliary" not in metrics
    assert all(torch.equal(v, st.auxiliary.state_dict()[k]) for k, v in aux_before.items())
    assert any(not torch.equal(v, st.generator.state_dict()[k]) for k, v in gen_before.items())
    with pytest.raises(UserError, match="dimo.weight: 0 with no GAN and no reward"):
        load_config(ROOT / "sweeps/presets/tiny_c2i.yaml", ["dimo.weight=0", "gan.weight=0"])


def test_dimo_prompts_apart_from_the_gan_captions_and_the_negative_prompt(tmp_path, monkeypatch):
    """Sec. 4.1: Di[M]O-loss prompts (LAION-Aesthetics-6+) apart from the GAN's real captions
    (DALLE3-1M); H.3: real and fake share their prompts; Di[M]O's Meissonic teacher takes a negative
    prompt for its unconditional branch."""
    (tmp_path / "captions.txt").write_text(f"{PROMPTS[0]}\n" * 8)
    cfg, ctx, st = fake_run("maskgen", tmp_path, [f"data.captions={tmp_path / 'captions.txt'}",
                                                  f"dimo.negative_prompt='{PROMPTS[0]}'",
                                                  "gan.start_step=0"])
    seen = []
    encode = ctx.teacher.encode_condition
    monkeypatch.setattr(ctx.teacher, "encode_condition", lambda labels=None, prompts=None:
                        seen.append(list(prompts)) or encode(prompts=prompts))
    discs = []
    real_step = steps.discriminator_step
    monkeypatch.setattr(steps, "discriminator_step",
                        lambda cfg, ctx, st, tokens, cond, probs: discs.append(cond) or
                        real_step(cfg, ctx, st, tokens, cond, probs))
    steps.train_step(cfg, ctx, st)
    b = cfg.train.batch_size
    assert seen[0] == [PROMPTS[0]] * b                      # the real batch's captions (GAN)
    assert seen[1] == [PROMPTS[1]] * b                      # the Di[M]O prompts (data.prompts)
    assert [PROMPTS[0]] in seen[2:]                         # the negative prompt (once), the teacher's u
    assert torch.equal(discs[0], encode(prompts=[PROMPTS[0]] * b))   # η: real captions for both sides
    with pytest.raises(UserError, match="data.prompts: is for text-to-image teachers"):
        fake_run("maskgit", tmp_path / "c2i", [f"data.prompts={tmp_path / 'captions.txt'}"])


def test_teacher_and_auxiliary_dropout_modes(tmp_path):
    """Di[M]O's MaskGit code runs φ and ψ in train mode (dropout 0.1) for the Di[M]O targets."""
    cfg, ctx, st = fake_run("maskgit", tmp_path)
    assert cfg.dimo.teacher_dropout and cfg.dimo.aux_dropout
    modes = spy_nets(ctx, st)
    steps.train_step(cfg, ctx, st)
    assert modes["teacher"][0] is True and not ctx.teacher.backbone.training   # back to eval after
    assert modes["aux"][0] is True
    cfg.dimo.teacher_dropout = cfg.dimo.aux_dropout = False
    for calls in modes.values():
        calls.clear()
    steps.train_step(cfg, ctx, st)
    assert modes["teacher"][0] is False and modes["aux"][0] is False


def test_auxiliary_gradient_is_not_clipped_at_zero(tmp_path):
    """Di[M]O code: θ's gradient is clipped to norm 1, ψ's is not (train.aux_grad_clip: 0)."""
    cfg, ctx, st = fake_run("maskgit", tmp_path)
    assert cfg.train.aux_grad_clip == 0.0 and cfg.train.grad_clip == 1.0
    loss = sum((p * 1e3).sum() for p in st.auxiliary.parameters() if p.requires_grad)
    norm = steps._update(st, "auxiliary", st.auxiliary, loss, cfg.train.aux_grad_clip)
    after = torch.sqrt(sum(p.grad.square().sum() for p in st.auxiliary.parameters() if p.grad is not None))
    assert norm > 1.0 and abs(float(after) - norm) / norm < 1e-5         # measured, left as is


def test_generator_freeze_and_adam_eps(tmp_path):
    """Di[M]O's MaskGit code fixes tok_emb, bias and pos_emb (fix_emb_layer) in θ and ψ, and uses
    Adam eps 1e-6 under bf16."""
    cfg, ctx, st = fake_run("maskgit", tmp_path)
    for net in (st.generator, st.auxiliary):
        frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
        assert {"tok_emb.weight", "bias", "pos_emb"} <= frozen
        assert any(p.requires_grad for p in net.parameters())
    assert all(group["eps"] == 1e-6 for opt in st.optimizers.values() for group in opt.param_groups)
    with pytest.raises(ConfigValueError, match="generator.freeze.0: 'nope' names no parameter"):
        fake_run("maskgit", tmp_path / "bad", ["generator.freeze=[nope]"])


def test_r_init_drawn_once_per_iteration(tmp_path, monkeypatch):
    """Di[M]O draws r_init once per training step (random_a_b), shared by θ's and ψ's samples."""
    cfg, ctx, st = fake_run("maskgit", tmp_path, ["generator.init_mask_ratio=[0.1, 0.9]"])
    ratios = []
    sample_init = steps.masking.sample_init
    monkeypatch.setattr(steps.masking, "sample_init",
                        lambda *a, **k: ratios.append(a[4]) or sample_init(*a, **k))
    for _ in range(2):
        steps.train_step(cfg, ctx, st)
    assert len(ratios) == 4 and ratios[0] == ratios[1] and ratios[2] == ratios[3]
    assert ratios[0] != ratios[2]


def test_training_temperature_is_one_and_generation_takes_table_5s(tmp_path, monkeypatch):
    """H.1: x_θ is sampled at temperature 1 during distillation; sample grids (generation) use
    Table 5's sampling temperature (12 for MaskGit)."""
    from trainers import loop

    cfg, ctx, st = fake_run("maskgit", tmp_path)
    used = []
    for module in (steps, loop):
        real = module.sample_from_logits
        monkeypatch.setattr(module, "sample_from_logits",
                            lambda z, g, t=1.0, *a, _r=real, **k: used.append(t) or _r(z, g, t, *a, **k))
    steps.train_step(cfg, ctx, st)
    assert used and set(used) == {1.0}
    used.clear()
    loop.save_grid(cfg, ctx, st, tmp_path / "grid")
    assert used == [12.0]


def _staged(root: Path, preset: str) -> list:
    """Overrides pointing every file of ``preset`` at empty staged files (existence is checked)."""
    from tests.unit.test_real_presets import stage

    stage(root / "staged", preset)
    return []


@pytest.fixture(autouse=True)
def _weights_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTDIMO_WEIGHTS", str(tmp_path / "staged"))


@pytest.mark.parametrize("family", ["maskgit", "maskbit", "maskgen", "meissonic"])
def test_teacher_cfg_is_u_plus_w_c_minus_u_for_every_family(family, tmp_path):
    """Table 5's teacher CFG is applied as u + w(c − u) for every family, with "u" the null
    condition or the preset's negative prompt (docs/recipes.md, CFG)."""
    cfg, ctx, st = fake_run(family, tmp_path, ["dimo.teacher_dropout=false"])
    t, b = ctx.teacher, 2
    cond = (t.encode_condition(labels=torch.tensor([0, 1])) if t.conditioning == "class"
            else t.encode_condition(prompts=PROMPTS))
    ids = torch.randint(0, t.V, (b, t.seq_len), generator=torch.Generator().manual_seed(0))
    e = t.embed_ids(ids)
    neg = cfg.dimo.negative_prompt
    null = (t.encode_condition(prompts=[neg] * b) if neg is not None else t.null_condition(b))
    with torch.no_grad():
        c = t.forward_embeddings(t.backbone, e, cond)[0]
        u = t.forward_embeddings(t.backbone, e, null)[0]
        ours = steps._teacher_with_cfg(cfg, ctx, e, cond)
    w = cfg.dimo.teacher_cfg
    assert w == {"maskgit": 2.0, "maskbit": 1.5, "maskgen": 4.0, "meissonic": 4.0}[family]
    torch.testing.assert_close(ours, u + w * (c - u), atol=1e-4, rtol=1e-4)
    assert (neg is not None) == (family == "meissonic")


def test_discriminator_start_defaults_to_the_gan_start(tmp_path):
    """Without gan.discriminator_start_step, gan.start_step gates both sides (as before)."""
    cfg, ctx, st = fake_run("maskgit", tmp_path, ["gan.start_step=1", "gan.discriminator_start_step=null"])
    assert "loss/discriminator" not in steps.train_step(cfg, ctx, st)
    assert {"loss/discriminator", "loss/gan_generator"} <= set(steps.train_step(cfg, ctx, st))
