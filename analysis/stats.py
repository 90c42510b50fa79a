"""Paired comparisons by seed: mean difference, its 95% confidence interval from Student's t and a p-value,
and the verdict rule every findings and ladder row uses. Pure Python (no scipy): the t distribution comes from
the regularized incomplete beta function, I_x(a, b), by its continued fraction (Numerical Recipes, sec. 6.4).

The rule: "agrees" / "disagrees" need at least ``MIN_SEEDS`` paired seeds and a 95% CI that excludes 0; fewer
seeds report the CI with no verdict. (With 2 seeds, a 2-standard-error rule fires ~30% of the time under no
effect: the t quantile at 1 degree of freedom is 12.7, not 2.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

MIN_SEEDS = 3  # paired seeds a verdict needs
LEVEL = 0.95


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz), converging for x < (a + 1) / (a + b + 2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (0.5 < p < 1), by bisection on the two-sided tail."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    tail = 2.0 * (1.0 - p)
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_sf2(mid, df) > tail else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """A paired comparison: n differences, their mean, the 95% CI of the mean and the two-sided p-value
    (CI and p are nan below 2 pairs)."""

    n: int
    mean: float
    lo: float
    hi: float
    p: float

    def ci(self) -> str:
        return "-" if self.lo != self.lo else f"[{self.lo:+.4f}, {self.hi:+.4f}]"

    def describe(self) -> str:
        """n, the mean paired difference and its 95% CI, e.g. ``n=3: +0.0027 [+0.0002, +0.0052]``."""
        return "n=0" if not self.n else f"n={self.n}: {self.mean:+.4f} {self.ci()}"


def paired(diffs: Iterable[float]) -> Paired:
    """Mean of the paired differences with its Student-t 95% CI (n - 1 degrees of freedom) and p-value."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(d) / n
    if n == 1:
        return Paired(1, mean, math.nan, math.nan, math.nan)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    half = t_quantile(0.5 + LEVEL / 2, n - 1) * se
    p = (0.0 if mean else 1.0) if se == 0 else t_sf2(mean / se, n - 1)
    return Paired(n, mean, mean - half, mean + half, p)


def verdict(diffs: Iterable[float]) -> str:
    """diffs: one per seed, positive in the paper's direction. 'agrees' / 'disagrees' when at least MIN_SEEDS
    pairs give a 95% CI above / below 0, 'within noise' when it holds 0; fewer pairs: 'n seeds: CI [lo, hi]'."""
    s = paired(diffs)
    if s.n == 0:
        return "not run"
    if s.n < MIN_SEEDS:
        return "1 seed: no CI" if s.n == 1 else f"{s.n} seeds: CI {s.ci()}"
    if s.lo > 0:
        return "agrees"
    if s.hi < 0:
        return "disagrees"
    return "within noise"
