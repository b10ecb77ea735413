"""Protected float32 torch kernels of the formula operators: finite output for every finite input.

Protection rules (the formula language's documented semantics):
- every result is clamped to [-BIG, BIG], so overflow becomes a large finite value, never inf;
- ``div`` floors the denominator's magnitude at EPS keeping its sign (0 counts as positive);
- ``log(x)`` is log(|x| + EPS), ``sqrt(x)`` is sqrt(|x|), ``exp`` clamps its input at EXP_MAX;
- ``pow(x, c)`` is |x|^c, with |x| floored at EPS when c < 0;
- matrix statistics (mms, zsn, the row / column norms, lowfrac) first divide by max|x|, which leaves
  them unchanged mathematically but keeps sums and squares of values near BIG finite.

Reductions are elementwise over the (out x in) matrix; their inputs must already have that shape.
"""

from __future__ import annotations

import torch

EPS = 1e-12
BIG = 1e30
EXP_MAX = 60.0  # e^60 ~ 1.1e26 < BIG
LOWFRAC_RATIO = 0.1  # Z-Pruner's rho: share of |x| below 0.1 * mean|x|


def finite(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-BIG, BIG)


def floor_magnitude(y: torch.Tensor) -> torch.Tensor:
    """y with |y| >= EPS, keeping the sign; zero becomes +EPS."""
    tiny = y.abs() < EPS
    return torch.where(tiny, torch.where(y < 0, -EPS, EPS).to(y.dtype), y)


def _nonzero(total: torch.Tensor) -> torch.Tensor:
    """Divisor for a normalization: an all-zero row / column / matrix is divided by 1 and stays zero."""
    return torch.where(total > 0, total, torch.ones_like(total))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / max|x|: same statistics up to a positive factor, with every value in [-1, 1]."""
    return x / _nonzero(x.abs().amax())


# --- elementwise unary -------------------------------------------------------------------------


def k_abs(x):
    return x.abs()


def k_neg(x):
    return -x


def k_sqr(x):
    return finite(x * x)


def k_sqrt(x):
    return x.abs().sqrt()


def k_log(x):
    return torch.log(x.abs() + EPS)


def k_exp(x):
    return torch.exp(x.clamp(max=EXP_MAX))


def k_tanh(x):
    return torch.tanh(x)


def k_sigmoid(x):
    return torch.sigmoid(x)


# --- matrix statistics -------------------------------------------------------------------------


def k_mms(x):
    """Min-max scaling over the whole matrix to [0, 1]; a constant matrix maps to zeros."""
    y = _unit(x)
    low, high = y.amin(), y.amax()
    return torch.where(high > low, (y - low) / (high - low).clamp_min(EPS), torch.zeros_like(y))


def k_zsn(x):
    """z-score over the whole matrix with the sample std (n - 1, as torch.std); constant -> zeros."""
    y = _unit(x)
    if y.numel() < 2:
        return torch.zeros_like(y)
    z = (y - y.mean()) / y.std().clamp_min(EPS)
    return torch.where(y.amax() > y.amin(), z, torch.zeros_like(y))


def k_rownorm(x):
    """x divided by its row's sum of |x| (RIA's row term)."""
    y = _unit(x)
    return y / _nonzero(y.abs().sum(dim=1, keepdim=True))


def k_colnorm(x):
    """x divided by its column's sum of |x| (RIA's column term)."""
    y = _unit(x)
    return y / _nonzero(y.abs().sum(dim=0, keepdim=True))


def k_rowl2(x):
    """x divided by its row's L2 norm (Z-Pruner's row normalization)."""
    y = _unit(x)
    return y / _nonzero(torch.linalg.vector_norm(y, dim=1, keepdim=True))


def k_coll2(x):
    """x divided by its column's L2 norm (Z-Pruner's column normalization)."""
    y = _unit(x)
    return y / _nonzero(torch.linalg.vector_norm(y, dim=0, keepdim=True))


def k_lowfrac(x):
    """Scalar (0-d): share of entries with |x| < 0.1 * mean|x| (Z-Pruner's rho)."""
    magnitude = _unit(x).abs()
    return (magnitude < LOWFRAC_RATIO * magnitude.mean()).float().mean()


# --- binary ------------------------------------------------------------------------------------


def k_add(x, y):
    return finite(x + y)


def k_sub(x, y):
    return finite(x - y)


def k_mul(x, y):
    return finite(x * y)


def k_div(x, y):
    return finite(x / floor_magnitude(y))


def k_pow(x, exponent: float):
    """|x|^c for the formula's numeric literal c."""
    base = x.abs()
    if exponent < 0:
        base = base.clamp_min(EPS)
    return finite(base**exponent)
