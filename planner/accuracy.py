"""The additive accuracy model: predict a policy's accuracy drop from a model profile.

A policy that stores MoE layer l with choice c (a codec at a level) is predicted to lose

    drop = alpha * M,   sd = sqrt(alpha^2 * V + se_alpha^2 * M^2),
    M = sum_l mu[l, c_l],   V = sum_l sigma[l, c_l]^2

of the chosen metric, averaged over the profiled tasks, where mu and sigma are the task-averaged
single-layer changes and their standard errors (from each row's paired 95 % interval), and alpha
is an additivity correction fitted on the profile's multi-layer rows (`group:*`, `all`): what the
model measured when several layers were perturbed at once, against the sum of their single-layer
effects. The sum of point estimates with the variance of the sum (not the sum of worst cases,
which makes any small budget infeasible on many layers) follows the usual error propagation for
independent estimates. A policy is feasible when the one-sided upper confidence bound
`drop + z * sd` (z = 1.645 for 95 %) is within the budget.

A layer whose error *raises* accuracy (the MoE-compression study, Ma et al., SC'25 workshops,
arXiv 2509.07727, saw this in deep layers) counts as a gain only if its change survives Holm's
step-down correction over all single-layer points of the profile; otherwise its mean is set to
zero (its uncertainty stays).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
from scipy.stats import norm

from profiles.errors import ConfigError, ProfileError
from profiles.profiling.metrics import TEXT_ROW

METRICS = ("content", "strict", "kl", "ppl")
TEXT_METRICS = ("kl", "ppl")  # one value per point, measured on the text corpus
Z95 = 1.959963984540054  # two-sided 95 % interval half-width in standard errors
Z_ONE_SIDED_95 = 1.6448536269514722
RAW = "raw"
EXACT_CODECS = ("raw", "lossless")  # bit-exact: the model is unchanged
MATRIX_KINDS = ("gate_up", "down")  # the matrices `--per-matrix` plans a level for, unless
SPLIT_KINDS = ("gate", "up", "down")  # ... the profile has gate-only and up-only points


def spec_label(codec: str, mode, level, options=None) -> str:
    """The label of a choice, as `StorageSpec.describe()` writes it (`szp:meanabs:0.5`, `rtn8`,
    `gq,bits=3,group=64`); `options` are the codec options as a dict or JSON text (a profile's
    `codec_options` column), completed with the codec's defaults."""
    if isinstance(level, float) and math.isnan(level):
        level = None
    if options is None or (isinstance(options, float) and math.isnan(options)):
        options = ""
    if not isinstance(options, str):
        options = json.dumps(dict(options), sort_keys=True)
    return _spec_label(str(codec), None if mode is None else str(mode),
                       None if level is None else float(level), options.strip())


@functools.lru_cache(maxsize=4096)
def _spec_label(codec: str, mode, level, options: str) -> str:
    from profiles.policy import StorageSpec

    opts = json.loads(options) if options else {}
    bounded = level is not None and not (isinstance(level, float) and math.isnan(level)) \
        and mode not in (None, "none", "")
    if bounded:
        return StorageSpec(codec, str(mode), float(level), opts).describe()
    return StorageSpec(codec, codec_options=opts).describe()


@dataclass(frozen=True)
class Effect:
    """One target's task-averaged effect of one choice (drop > 0 means accuracy fell)."""

    target: str
    label: str
    drop: float  # used by the model (a gain that fails Holm is set to 0)
    sd: float  # standard error of the task mean
    measured_drop: float  # the profile's task mean, before Holm gating
    p_value: float | None
    tasks: int
    gain_zeroed: bool = False


@dataclass(frozen=True)
class Additivity:
    """measured multi-layer drop ~ alpha * (sum of single-layer drops), fitted by weighted least
    squares through the origin; `alpha_se` is its standard error (inflated by the reduced
    chi-square when the points scatter more than their intervals)."""

    alpha: float
    alpha_se: float
    points: int
    chi2_reduced: float | None
    note: str

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "alpha_se": self.alpha_se, "points": self.points,
                "chi2_reduced": self.chi2_reduced, "note": self.note}


@dataclass(frozen=True)
class DropPrediction:
    """A predicted accuracy drop (fraction, or nats for kl) with its uncertainty."""

    metric: str
    drop: float
    sd: float
    z: float
    additive_drop: float
    additive_var: float
    kind: str = "predicted (additive accuracy model)"

    @property
    def low(self) -> float:  # two-sided 95 % interval
        return self.drop - Z95 * self.sd

    @property
    def high(self) -> float:
        return self.drop + Z95 * self.sd

    @property
    def ucb(self) -> float:  # the one-sided bound checked against the budget
        return self.drop + self.z * self.sd

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": self.drop, "low": self.low, "high": self.high,
                "sd": self.sd, "ucb": self.ucb, "z": self.z, "interval": "95% two-sided",
                "kind": self.kind}


@dataclass(frozen=True)
class Constraint:
    """`g(M, V) = alpha*M + z*sqrt(alpha^2*V + se^2*M^2) <= budget` on M = sum mu, V = sum sigma^2.

    g is convex in M and increasing in V, so for a fixed V the feasible M form an interval,
    which is what lets the MILP handle the square root exactly (see `planner.milp`).
    """

    budget: float
    z: float = Z_ONE_SIDED_95
    alpha: float = 1.0
    alpha_se: float = 0.0

    def g(self, M, V):
        M, V = np.asarray(M, dtype=float), np.asarray(V, dtype=float)
        return self.alpha * M + self.z * np.sqrt(np.maximum(
            self.alpha ** 2 * V + self.alpha_se ** 2 * M ** 2, 0.0))

    def feasible(self, M: float, V: float, tol: float = 1e-12) -> bool:
        return bool(self.g(M, V) <= self.budget + tol * max(1.0, abs(self.budget)))

    def m_interval(self, V: float, m_lo: float, m_hi: float) -> tuple[float, float] | None:
        """The M in [m_lo, m_hi] with g(M, V) <= budget (an interval, g being convex), or None."""
        g = lambda m: float(self.g(m, V))  # noqa: E731
        a, b = m_lo, m_hi
        for _ in range(200):  # ternary search for the minimum of a convex function
            m1, m2 = a + (b - a) / 3, b - (b - a) / 3
            if g(m1) <= g(m2):
                b = m2
            else:
                a = m1
        best = (a + b) / 2
        if g(best) > self.budget:
            return None
        left = m_lo if g(m_lo) <= self.budget else _bisect(g, m_lo, best, self.budget, True)
        right = m_hi if g(m_hi) <= self.budget else _bisect(g, best, m_hi, self.budget, False)
        return left, right


def _bisect(g, a: float, b: float, budget: float, rising_left: bool) -> float:
    """Boundary of {g <= budget} between a and b, returned on the feasible side."""
    for _ in range(200):
        mid = (a + b) / 2
        ok = g(mid) <= budget
        if rising_left:  # infeasible at a, feasible at b
            a, b = (a, mid) if ok else (mid, b)
        else:  # feasible at a, infeasible at b
            a, b = (mid, b) if ok else (a, mid)
    return b if rising_left else a


class AccuracyModel:
    """Per-layer effects, the Holm gate and the additivity correction of one metric.

    Args:
        sensitivity: `sensitivity.parquet` as a DataFrame (columns of docs/model-profile.md).
        metric: `content` (default), `strict` (absolute fractions), `kl` (nats per token) or
            `ppl` (perplexity ratio - 1).
        tasks: average `content`/`strict` over these tasks only (None: every task).
        z: one-sided standard-normal quantile of the feasibility bound (1.645 = 95 %).
        holm_alpha: family-wise error rate of the Holm gate on gains.
        surrogate: which rows to use (`none` = real codec round trips).
        matrix: which points to use: `all` (whole experts, default), or a matrix kind
            (`gate_up`, `down`, `gate`, `up`: the points of `profile model --per-matrix` that
            perturbed only that matrix).

    Raises:
        ConfigError: an unknown metric or a non-positive z.
        ProfileError: the profile has no usable single-layer rows.
    """

    def __init__(self, sensitivity: pd.DataFrame, metric: str = "content",
                 z: float = Z_ONE_SIDED_95, holm_alpha: float = 0.05,
                 surrogate: str = "none", tasks: list[str] | None = None,
                 matrix: str = "all") -> None:
        if metric not in METRICS:
            raise ConfigError(f"--metric {metric!r} is unknown; choose {', '.join(METRICS)}")
        if not (isinstance(z, (int, float)) and math.isfinite(z) and z >= 0):
            raise ConfigError(f"confidence z {z!r} must be a number >= 0 (1.645 = one-sided 95 %)")
        self.metric, self.z, self.holm_alpha = metric, float(z), holm_alpha
        df = sensitivity[(sensitivity["surrogate"].astype(str) == surrogate)
                         & (sensitivity["experts"].astype(str) == "all")]
        if "matrix" in df.columns:   # whole-expert points, or one matrix kind's
            df = df[df["matrix"].fillna("all").astype(str) == matrix]
        elif matrix != "all":
            df = df.iloc[0:0]
        if df.empty and matrix != "all":
            raise ProfileError(f"the profile has no per-matrix rows ({matrix} only); profile with "
                               f"`moesz profile model --per-matrix` to plan per matrix")
        self.matrix = matrix
        self.matrix_models: dict[str, "AccuracyModel"] = {}
        self.matrix_kinds: tuple[str, ...] = ()       # the kinds `attach_matrices` plans
        self._args = (metric, z, holm_alpha, surrogate, tasks)
        if df.empty:
            raise ProfileError(f"sensitivity profile has no rows with surrogate {surrogate!r} and "
                               f"experts 'all'; profile with real codec round trips")
        # profiles made before the text metrics have KL without an interval: its spread over
        # the task rows is its uncertainty, as before
        self._legacy_kl = metric == "kl" and ("kl_low" not in df.columns
                                              or not df["kl_low"].notna().any())
        if metric in TEXT_METRICS and not self._legacy_kl:
            # the text metrics repeat on every task row of a point: one value per point
            df = df.assign(task="text")
        else:
            df = df[df["task"].astype(str) != TEXT_ROW]
            if tasks is not None:
                df = df[df["task"].astype(str).isin(list(tasks))]
            if df.empty:
                raise ProfileError(f"the profile has no accuracy rows for {metric} "
                                   f"{'of ' + ', '.join(tasks) if tasks else ''}; profile with "
                                   f"--bench FILE, --lm-eval TASK or the built-in tasks")
        self.tasks = sorted(df["task"].astype(str).unique())
        self.notes: list[str] = []
        effects = self._aggregate(df)
        single = {k: e for k, e in effects.items() if k[0].startswith("layer:")}
        if not single:
            raise ProfileError("sensitivity profile has no single-layer rows (target layer:N); "
                               "profile with --layers all")
        single = self._holm(single)
        self.effects: dict[tuple[int, str], Effect] = {
            (int(t.split(":", 1)[1]), lab): e for (t, lab), e in single.items()}
        self.multi: dict[tuple[str, str], tuple[Effect, tuple[int, ...]]] = {
            k: (e, self._layers_of[k[0]]) for k, e in effects.items()
            if not k[0].startswith("layer:")}
        self.additivity = self._fit_additivity()
        self.constraint_params = (self.additivity.alpha, self.additivity.alpha_se)

    # -- building --------------------------------------------------------------------------
    def _row_drop(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        if self.metric in TEXT_METRICS:
            col, shift = ("kl_nats", 0.0) if self.metric == "kl" else ("ppl_ratio", 1.0)
            low, high = ("kl_low", "kl_high") if self.metric == "kl" else \
                ("ppl_ratio_low", "ppl_ratio_high")
            if col not in df.columns:
                raise ProfileError(f"the profile has no {col} column (made before the text "
                                   f"metrics); profile again to plan on {self.metric}")
            half = ((df[high].to_numpy(float) - df[low].to_numpy(float)) / 2
                    if high in df.columns else np.full(len(df), np.nan))
            return df[col].to_numpy(float) - shift, np.abs(half) / Z95
        ch = df[f"{self.metric}_change"].to_numpy(float)
        half = (df[f"{self.metric}_change_high"].to_numpy(float)
                - df[f"{self.metric}_change_low"].to_numpy(float)) / 2
        return -ch, np.abs(half) / Z95

    def _aggregate(self, df: pd.DataFrame) -> dict[tuple[str, str], Effect]:
        drop, sd = self._row_drop(df)
        p = df[f"{self.metric}_mcnemar_p"].to_numpy(float) if self.metric not in TEXT_METRICS \
            else np.full(len(df), np.nan)
        opts = df["codec_options"] if "codec_options" in df.columns else [None] * len(df)
        labels = [spec_label(c, m, lv, o) for c, m, lv, o in zip(df["codec"].astype(str),
                                                                 df["mode"], df["level"], opts)]
        flat = pd.DataFrame({"target": df["target"].astype(str).to_numpy(), "label": labels,
                             "task": df["task"].astype(str).to_numpy(), "d": drop, "s": sd,
                             "p": p, "layers": df["layers"].astype(str).to_numpy()})
        # one value per (target, choice, task): repeated rows (a resumed sweep) are averaged
        per_task = flat.groupby(["target", "label", "task"], sort=True).agg(
            d=("d", "mean"), s=("s", "mean"), p=("p", "mean"), layers=("layers", "first"))
        per_task["s2"] = per_task["s"] ** 2
        g = per_task.groupby(level=[0, 1], sort=True)
        agg = pd.DataFrame({"mean": g["d"].mean(), "T": g["d"].size(), "std": g["d"].std(ddof=1),
                            "s2": g["s2"].sum(), "p": g["p"].first(),
                            "layers": g["layers"].first()})
        self._layers_of = {}
        out = {}
        for (target, label), row in zip(agg.index, agg.itertuples(index=False)):
            mean, T = float(row.mean), int(row.T)
            if not math.isfinite(mean):
                continue
            if self._legacy_kl:
                sd_m = float(row.std) / math.sqrt(T) if T >= 2 else 0.0
            else:
                sd_m = math.sqrt(float(row.s2)) / T
            sd_m = sd_m if math.isfinite(sd_m) else 0.0
            if self.metric in TEXT_METRICS:
                pv = None
            elif T == 1 and math.isfinite(row.p):
                pv = float(row.p)  # the exact McNemar test of the one task
            elif sd_m > 0:
                pv = float(2 * norm.sf(abs(mean) / sd_m))
            else:
                pv = 0.0 if mean != 0 else 1.0
            out[(target, label)] = Effect(target, label, mean, sd_m, mean, pv, T)
            self._layers_of[target] = tuple(int(x) for x in str(row.layers).split(",")
                                            if x.strip())
        return out

    def _holm(self, effects: dict) -> dict:
        """Zero every gain (drop < 0) that does not survive Holm's step-down correction (for
        ppl: whose 95 % interval does not exclude no change)."""
        if self.metric == "kl":
            return effects
        if self.metric == "ppl":
            return {k: (Effect(e.target, e.label, 0.0, e.sd, e.measured_drop, None, e.tasks, True)
                        if e.drop < 0 and e.drop + Z95 * e.sd >= 0 else e)
                    for k, e in effects.items()}
        keys = [k for k, e in effects.items() if e.p_value is not None]
        order = sorted(keys, key=lambda k: effects[k].p_value)
        m, rejected = len(order), set()
        for i, k in enumerate(order):
            if effects[k].p_value <= self.holm_alpha / (m - i):
                rejected.add(k)
            else:
                break
        out, zeroed = {}, 0
        for k, e in effects.items():
            if e.drop < 0 and k not in rejected:
                e = Effect(e.target, e.label, 0.0, e.sd, e.measured_drop, e.p_value, e.tasks, True)
                zeroed += 1
            out[k] = e
        kept = sum(1 for k, e in out.items() if e.drop < 0)
        if zeroed or kept:
            self.notes.append(f"gains: {kept} single-layer gain(s) survive Holm at "
                              f"{self.holm_alpha:g} and count; {zeroed} gain(s) that do not count "
                              f"as zero")
        return out

    def _fit_additivity(self) -> Additivity:
        P, M, W = [], [], []
        for (target, label), (eff, layers) in self.multi.items():
            singles = [self.effects.get((lay, label)) for lay in layers]
            if not layers or any(s is None for s in singles):
                continue
            p = sum(s.drop for s in singles)
            var = sum(s.sd ** 2 for s in singles) + eff.sd ** 2
            if var <= 0:
                continue
            P.append(p)
            M.append(eff.drop)
            W.append(1.0 / var)
        P, M, W = map(np.asarray, (P, M, W))
        sxx = float((W * P * P).sum()) if len(P) else 0.0
        if len(P) == 0 or sxx <= 0:
            note = ("additivity not checked: the profile has no multi-layer rows (group:*, all) "
                    "whose layers all have single-layer rows; alpha = 1 assumed, uncertainty of "
                    "the assumption not counted")
            return Additivity(1.0, 0.0, 0, None, note)
        alpha = float((W * P * M).sum() / sxx)
        se = math.sqrt(1.0 / sxx)
        chi2 = None
        if len(P) >= 2:
            chi2 = float((W * (M - alpha * P) ** 2).sum() / (len(P) - 1))
            se *= math.sqrt(max(1.0, chi2))
        note = (f"fitted on {len(P)} multi-layer point(s): measured = {alpha:.3f} x sum of "
                f"single-layer drops (se {se:.3f})")
        if alpha < 0:
            note += "; a negative fit is not physical, clipped to 0"
            alpha = 0.0
        return Additivity(alpha, se, len(P), chi2, note)

    # -- use ---------------------------------------------------------------------------------
    def labels_for(self, layer: int) -> list[str]:
        """Choices with a single-layer row at `layer` (raw is always available)."""
        return sorted({lab for (lay, lab) in self.effects if lay == layer})

    def attach_matrices(self, sensitivity: pd.DataFrame) -> None:
        """Add the per-matrix models from the profile's per-matrix points, so `effect` answers
        per-matrix labels (`gate_up=A;down=B`, `gate=A;up=B;down=C`). The planned kinds
        (`matrix_kinds`) are `gate`, `up` and `down` where the profile has gate-only and up-only
        points (`profile model --matrices gate,up,down`), else `gate_up` and `down`.

        Raises:
            ProfileError: the profile has no per-matrix rows for a planned kind (one line
                naming `--per-matrix` and `--matrices`).
        """
        metric, z, holm, surrogate, tasks = self._args
        have = set(sensitivity["matrix"].astype(str)) if "matrix" in sensitivity.columns \
            else set()
        self.matrix_kinds = SPLIT_KINDS if {"gate", "up"} <= have else MATRIX_KINDS
        models = {}
        for m in self.matrix_kinds + (("gate_up",) if "gate_up" in have
                                       and "gate_up" not in self.matrix_kinds else ()):
            try:
                models[m] = AccuracyModel(sensitivity, metric, z, holm, surrogate, tasks,
                                          matrix=m)
            except ProfileError:
                if m == "gate_up" and m not in self.matrix_kinds:
                    continue
                raise ProfileError(f"the profile has no per-matrix rows for {m}; profile with "
                                   f"`moesz profile model --per-matrix --matrices "
                                   f"{','.join(self.matrix_kinds)}` to plan per matrix") from None
        self.matrix_models = models
        kinds = ", ".join(self.matrix_kinds)
        self.notes = list(self.notes) + [
            f"per matrix: a level per (layer, matrix: {kinds}); the drop of a layer whose "
            f"matrices differ is the sum of the matrices' single-matrix drops (variances added; "
            f"additivity over matrices assumed, as over layers)"
            + ("; gate and up at one level use the gate_up-only row" if "gate" in kinds
               and "gate_up" in models else "")
            + "; all at one level use the whole-expert row"]

    def effect(self, layer: int, label: str) -> tuple[float, float] | None:
        """(mu, sigma) of a choice at a layer; (0, 0) for bit-exact codecs; None when unprofiled.
        A per-matrix label `gate_up=A;down=B` (with `attach_matrices`) adds the single-matrix
        effects of A on gate_up and B on down (likewise for gate, up and down; gate and up at the
        same level count as gate_up at that level where the profile has that row at that layer,
        else as the sum of their own rows)."""
        if ";" in label and self.matrix_models:
            parts = dict(p.split("=", 1) for p in label.split(";"))
            fused = self.matrix_models.get("gate_up")
            if parts.get("gate") is not None and parts.get("gate") == parts.get("up") \
                    and fused is not None and (layer, parts["gate"]) in fused.effects:
                parts["gate_up"] = parts.pop("gate")
                del parts["up"]
            mu = var = 0.0
            for kind, lab in parts.items():
                if lab.split(",")[0] in EXACT_CODECS:
                    continue
                model = self.matrix_models.get(kind)
                e = None if model is None else model.effects.get((layer, lab))
                if e is None:
                    return None
                mu, var = mu + e.drop, var + e.sd ** 2
            return mu, math.sqrt(var)
        if label.split(",")[0] in EXACT_CODECS:
            return 0.0, 0.0
        e = self.effects.get((layer, label))
        return None if e is None else (e.drop, e.sd)

    def constraint(self, budget: float) -> Constraint:
        return Constraint(budget, self.z, self.additivity.alpha, self.additivity.alpha_se)

    def predict_sums(self, M: float, V: float) -> DropPrediction:
        """Prediction from the sum of per-layer means M and of variances V."""
        a, se = self.additivity.alpha, self.additivity.alpha_se
        sd = math.sqrt(max(a * a * V + se * se * M * M, 0.0))
        return DropPrediction(self.metric, a * M, sd, self.z, M, V)

    def predict(self, choices: Mapping[int, str]) -> DropPrediction:
        """Predicted drop of a policy given as {MoE layer: choice label} (absent = raw)."""
        M = V = 0.0
        for layer, label in choices.items():
            eff = self.effect(layer, label)
            if eff is None:
                raise ProfileError(f"the profile has no single-layer row for {label} at layer "
                                   f"{layer}; profile it or choose another level")
            M += eff[0]
            V += eff[1] ** 2
        return self.predict_sums(M, V)

    def measured(self, target: str, label: str) -> Effect | None:
        """The profile's own measurement of a multi-layer target (e.g. `all`) at a choice."""
        hit = self.multi.get((target, label))
        return None if hit is None else hit[0]

    def measured_uniform(self, label: str) -> DropPrediction | None:
        """The drop of `label` on every layer as the profile MEASURED it (target `all`, this exact
        policy), as a prediction with that measurement's interval; None when not profiled.

        For a uniform policy this is the direct evidence, narrower than the additive model's sum
        of every layer's own uncertainty."""
        if label.split(",")[0] in EXACT_CODECS:
            return None  # bit-exact: the drop is exactly zero, no measurement needed
        eff = self.measured("all", label)
        if eff is None:
            return None
        drop = max(eff.drop, 0.0)  # a gain counts as none, as unconfirmed single-layer gains do
        return DropPrediction(self.metric, drop, eff.sd, self.z, drop, eff.sd ** 2,
                              "measured (profile, whole model at this setting)")

    def detection_warning(self, budget: float, detection_limit: dict | None) -> str | None:
        """A warning when the budget is below what the profile can detect, else None."""
        if self.metric in TEXT_METRICS:
            return None
        if detection_limit and detection_limit.get("metric", self.metric) == self.metric \
                and detection_limit.get("half_width") is not None:
            hw, how = float(detection_limit["half_width"]), "the profile's detection limit"
        else:
            sds = [e.sd for e in self.effects.values() if e.sd > 0]
            if not sds:
                return None
            hw, how = Z95 * float(np.median(sds)), "estimated from the per-layer intervals"
        if budget < hw:
            return (f"budget {budget:g} is below the smallest {self.metric} change the profile can "
                    f"detect ({hw:.4f}, {how}); the plan's accuracy cannot be checked at this "
                    f"sample size (profile with more prompts, or raise the budget)")
        return None
