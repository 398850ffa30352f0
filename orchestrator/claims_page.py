"""The paper's claims (issue 14, a-f) as checks on plain numbers: arms' per-seed metrics and the
teacher's references in, verdicts, a Markdown page and small PNG plots out (no MLflow, no Ray).

A check says "arm A's metric beats reference B" (another arm's metric, or the teacher at some step
count, optionally times a factor). Its verdict follows ``RULE``: with d the improvement of A's
mean over B (positive: A better) and SE = sqrt(s_A^2/n_A + s_B^2/n_B) (s: the standard deviation
over seeds; a teacher reference has one value, its SE is its evaluation's bootstrap SE if known, else
0), **reproduced** if d > 2 SE, **not reproduced** if d < -2 SE, **within noise** otherwise, and
**too few seeds** if A (or an arm B) has fewer than 2 seeds. A claim is reproduced when all its
checks are, not reproduced when any is, else within noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

RULE = ("d = improvement of the arm's mean over the reference (positive: the arm is better); "
        "SE = sqrt(s_A²/n_A + s_B²/n_B), s = standard deviation over seeds (a teacher reference: its "
        "evaluation's bootstrap SE, else 0). **reproduced** if d > 2·SE, **not reproduced** if "
        "d < −2·SE, **within noise** otherwise; fewer than 2 seeds: **too few seeds**. A claim is "
        "reproduced when all its checks are, not reproduced when any is not, else within noise.")
REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE, TOO_FEW = ("reproduced", "not reproduced", "within noise",
                                                     "too few seeds")


@dataclass(frozen=True)
class Ref:
    """What a check compares against: an arm's metric or the teacher's at ``steps`` sampling steps."""
    kind: str                 # "arm" | "teacher"
    name: str | int           # arm name, or the teacher's step count
    metric: str | None = None # None: the check's own metric
    factor: float = 1.0       # beat factor x the reference (claim a: 1.1x the 16-step teacher's FID)


@dataclass(frozen=True)
class Check:
    arm: str
    metric: str
    ref: Ref
    higher_is_better: bool


@dataclass(frozen=True)
class Claim:
    key: str                  # "a".."f"
    text: str
    paper: str                # the paper's figure/table it mirrors
    track: str                # "c2i" | "t2i": which claims sweep holds its arms
    checks: tuple[Check, ...]
    shown: tuple[str, ...] = ()   # arms shown beside the checked ones (the first-stage student)


FID, GENEVAL, CLIP = "eval/world_fid", "eval/geneval_world", "eval/world_clip"
TTS_GENEVAL = "eval/tts/geneval_world"
CLAIMS = (
    Claim("a", "one-step student ≪ one-step teacher, and ≤ 1.1× the 16-step CFG teacher's world-FID",
          "Table 3 (one step vs the teacher's multi-step sampling)", "c2i",
          (Check("soft_gan", FID, Ref("teacher", 1), False),
           Check("soft_gan", FID, Ref("teacher", 16, factor=1.1), False))),
    Claim("b", "Di[M]O + GAN beats Di[M]O alone (same iterations from the same student)",
          "Table 3 / Fig. 4", "c2i", (Check("soft_gan", FID, Ref("arm", "dimo_only"), False),), ("student",)),
    Claim("c", "soft embeddings beat Gumbel-softmax straight-through", "Fig. 4a", "c2i",
          (Check("soft_gan", FID, Ref("arm", "gumbel_st"), False),)),
    Claim("d", "the GAN mask range matters: [0, 0.95] < [0, 0.5] < [0, 0] in world-FID", "Fig. 4c", "c2i",
          (Check("soft_gan", FID, Ref("arm", "mask_0"), False),
           Check("mask_095", FID, Ref("arm", "soft_gan"), False))),
    Claim("e", "reward fine-tuning lifts world-CLIP and GenEval-world above the Di[M]O-only student, "
          "and GenEval-world to or above the 16-step teacher", "Table 2", "t2i",
          (Check("reward", CLIP, Ref("arm", "dimo_only"), True),
           Check("reward", GENEVAL, Ref("arm", "dimo_only"), True),
           Check("reward", GENEVAL, Ref("teacher", 16), True)), ("student",)),
    Claim("f", "Best-of-N + TTEO lifts GenEval-world further, above the 16-step teacher",
          "Table 2 + test-time scaling", "t2i",
          (Check("reward", TTS_GENEVAL, Ref("arm", "reward", GENEVAL), True),
           Check("reward", TTS_GENEVAL, Ref("teacher", 16, GENEVAL), True))),
)
ARM_LABELS = {"dimo_only": "Di[M]O only", "soft_gan": "Di[M]O + GAN, soft, mask [0, 0.5]",
              "gumbel_st": "Di[M]O + GAN, Gumbel ST", "mask_0": "Di[M]O + GAN, mask [0, 0]",
              "mask_095": "Di[M]O + GAN, mask [0, 0.95]", "reward": "Di[M]O + reward",
              "student": "the Di[M]O student (first stage)"}


@dataclass
class Stats:
    values: list[float]
    se_known: float | None = None     # a single teacher evaluation's bootstrap SE

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.values else math.nan

    @property
    def std(self) -> float:
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def var_of_mean(self) -> float:
        if self.se_known is not None:
            return self.se_known ** 2
        return self.std ** 2 / self.n if self.n >= 2 else 0.0

    def text(self, digits: int = 4) -> str:
        if not self.values:
            return "—"
        body = f"{self.mean:.{digits}g}"
        if self.se_known is not None:
            return body + f" ± {self.se_known:.2g} (eval. SE)"
        return body + (f" ± {self.std:.2g}" if self.n >= 2 else "") + f" (n={self.n})"


def verdict(d: float, se: float, enough: bool) -> str:
    """The rule of ``RULE`` for one check (d > 0: the claim's direction)."""
    if not enough:
        return TOO_FEW
    if d > 2 * se:
        return REPRODUCED
    if d < -2 * se:
        return NOT_REPRODUCED
    return WITHIN_NOISE


def combine(verdicts: Sequence[str]) -> str:
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    if any(v == TOO_FEW for v in verdicts) or not verdicts:
        return TOO_FEW
    return WITHIN_NOISE


@dataclass
class Data:
    """arms[track][arm][metric] -> per-seed values; teacher[track][steps][metric] -> value (and
    metric + "_se"); seeds[track] the seeds run; curves[track][arm][metric][step] -> the per-seed
    values evaluated at that training step (the runs' trajectories, shown beside the verdicts)."""
    arms: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)

    def stats(self, track: str, arm: str, metric: str) -> Stats:
        return Stats(list(self.arms.get(track, {}).get(arm, {}).get(metric, [])))

    def reference(self, track: str, ref: Ref, metric: str) -> Stats:
        metric = ref.metric or metric
        if ref.kind == "arm":
            s = self.stats(track, ref.name, metric)
            return Stats([v * ref.factor for v in s.values])
        values = self.teacher.get(track, {}).get(int(ref.name), {})
        if metric not in values:
            return Stats([])
        se = values.get(metric + "_se")
        return Stats([values[metric] * ref.factor], se_known=0.0 if se is None else se * ref.factor)


@dataclass
class CheckResult:
    check: Check
    subject: Stats
    reference: Stats
    d: float
    se: float
    verdict: str

    def describe(self) -> str:
        c, r = self.check, self.check.ref
        what = ("the 16-step teacher" if r.kind == "teacher" and r.name == 16 else
                f"the {r.name}-step teacher" if r.kind == "teacher" else ARM_LABELS.get(r.name, r.name))
        factor = f"{r.factor:g}× " if r.factor != 1 else ""
        sign = "higher" if c.higher_is_better else "lower"
        ref_metric = f" ({r.metric})" if r.metric and r.metric != c.metric else ""
        return f"{c.arm}: {c.metric} {sign} than {factor}{what}{ref_metric}"


def evaluate_claim(claim: Claim, data: Data) -> list[CheckResult]:
    out = []
    for check in claim.checks:
        a = data.stats(claim.track, check.arm, check.metric)
        b = data.reference(claim.track, check.ref, check.metric)
        enough = a.n >= 2 and (check.ref.kind == "teacher" and b.n == 1 or b.n >= 2)
        d = (a.mean - b.mean) if check.higher_is_better else (b.mean - a.mean)
        se = math.sqrt(a.var_of_mean() + b.var_of_mean()) if enough else math.nan
        out.append(CheckResult(check, a, b, d, se, verdict(d, se, enough)))
    return out


# --- rendering ------------------------------------------------------------------------------------

def _claim_metrics(claim: Claim) -> list[str]:
    metrics = []
    for c in claim.checks:
        for m in (c.metric, c.ref.metric or c.metric):
            if m not in metrics:
                metrics.append(m)
    return metrics


def _claim_arms(claim: Claim) -> list[str]:
    arms = []
    for c in claim.checks:
        for a in (c.arm, c.ref.name if c.ref.kind == "arm" else None):
            if a is not None and a not in arms:
                arms.append(a)
    return arms


def _teacher_steps(claim: Claim) -> list[int]:
    return sorted({int(c.ref.name) for c in claim.checks if c.ref.kind == "teacher"})


def plot_claim(claim: Claim, data: Data, path: Path) -> Path:
    """Per metric of the claim: the arms' means with ± std over seeds as bars, the teacher's
    references as dashed lines (small PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics, arms = _claim_metrics(claim), _claim_arms(claim)
    fig = Figure(figsize=(3.2 * len(metrics), 2.8), layout="constrained")
    FigureCanvasAgg(fig)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        stats = [data.stats(claim.track, a, metric) for a in arms]
        ax.bar(range(len(arms)), [s.mean if s.values else 0 for s in stats],
               yerr=[s.std if s.n >= 2 else 0 for s in stats], capsize=3, color="tab:blue", alpha=0.7)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize="small")
        for steps, style in zip(_teacher_steps(claim), ("--", ":")):
            ref = data.reference(claim.track, Ref("teacher", steps), metric)
            if ref.values:
                ax.axhline(ref.mean, linestyle=style, color="tab:red", label=f"teacher {steps} steps")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
        ax.set_title(metric, fontsize="small")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"claim {claim.key} ({claim.paper})", fontsize="small")
    fig.savefig(path, dpi=80)
    return path


def _num(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), line(["---"] * len(header))] + [line(r) for r in rows]


def _curve_table(claim: Claim, data: Data, arms: list[str]) -> list[str]:
    """The claim's first metric at every evaluated step, mean over seeds, when the runs were
    evaluated more than once: how far one checkpoint moves from the next."""
    metric = _claim_metrics(claim)[0]
    curves = {a: data.curves.get(claim.track, {}).get(a, {}).get(metric, {}) for a in arms}
    steps = sorted({s for c in curves.values() for s in c})
    if len(steps) < 2:
        return []
    rows = [[ARM_LABELS.get(a, a) + f" (`{a}`)"]
            + [_num(sum(c[s]) / len(c[s])) if c.get(s) else "—" for s in steps] for a, c in curves.items()]
    return ["", f"{metric} at each evaluated training step, mean over seeds (the verdicts use each "
            "seed's mean over the second half):", ""] + _table(["arm"] + [f"step {s}" for s in steps], rows)


def render(data: Data, out: Path, command: str, commit: str, sources: dict[str, str],
           claims: Sequence[Claim] = CLAIMS) -> tuple[list[Path], str, dict[str, str]]:
    """Write claims.md and one PNG per claim to ``out``; -> (files, the page, claim -> verdict).
    ``sources``: track -> where its numbers come from (sweep folder and parent run)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {c.key: evaluate_claim(c, data) for c in claims}
    verdicts = {k: combine([r.verdict for r in rs]) for k, rs in results.items()}
    seeds = {t: ", ".join(map(str, s)) for t, s in data.seeds.items()}
    lines = ["# The paper's claims on the embedded world", "",
             f"- command: `{command}`", f"- commit: `{commit}`"]
    lines += [f"- {track}: {where} (seeds {seeds.get(track, '—')})" for track, where in sources.items()]
    lines += ["", f"**Verdict rule.** {RULE}", ""]
    lines += _table(["claim", "what", "paper", "verdict", "seeds"],
                    [[c.key, c.text, c.paper, f"**{verdicts[c.key]}**", seeds.get(c.track, "—")]
                     for c in claims])
    files = []
    for claim in claims:
        metrics, arms = _claim_metrics(claim), _claim_arms(claim)
        arms += [a for a in claim.shown if a in data.arms.get(claim.track, {})]
        lines += ["", f"## Claim {claim.key}: {claim.text}", "",
                  f"Mirrors the paper's {claim.paper}. Verdict: **{verdicts[claim.key]}**.", ""]
        rows = [[ARM_LABELS.get(a, a) + f" (`{a}`)"] + [data.stats(claim.track, a, m).text() for m in metrics]
                for a in arms]
        rows += [[f"teacher, {s} step{'s' if s > 1 else ''}"] + [data.reference(claim.track, Ref("teacher", s), m).text()
                                            for m in metrics] for s in _teacher_steps(claim)]
        lines += _table(["arm"] + [f"{m} (mean ± std over seeds)" for m in metrics], rows) + [""]
        lines += _table(["check", "d", "2·SE", "verdict"],
                        [[r.describe(), _num(r.d), _num(2 * r.se), r.verdict] for r in results[claim.key]])
        lines += _curve_table(claim, data, arms=_claim_arms(claim))
        if claim.key == "d":
            order = sorted((data.stats(claim.track, a, FID).mean, a) for a in ("mask_0", "soft_gan", "mask_095")
                           if data.stats(claim.track, a, FID).values)
            names = {"mask_0": "[0, 0]", "soft_gan": "[0, 0.5]", "mask_095": "[0, 0.95]"}
            lines += ["", "Order this world gives (world-FID, best first): "
                      + " < ".join(f"{names[a]} ({m:.3g})" for m, a in order)
                      + "; the paper's Fig. 4c: [0, 0.95] < [0, 0.5] < [0, 0]."]
        png = plot_claim(claim, data, out / f"claim_{claim.key}.png")
        files.append(png)
        lines += ["", f"![claim {claim.key}]({png.name})"]
    page = "\n".join(lines) + "\n"
    (out / "claims.md").write_text(page)
    return files + [out / "claims.md"], page, verdicts
