"""Damped Hessian helpers shared by the OBS-style solvers and the H / U primitives."""

from __future__ import annotations

import torch


def damped_hessian(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """H + percdamp * mean(diag H) * I in float32; dead inputs (zero diagonal) get diagonal 1, as SparseGPT."""
    h = hessian.float().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    damp = percdamp * torch.mean(diag)
    diag += damp
    return h


def damped_inverse(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Inverse of the damped Hessian via Cholesky (symmetric positive definite after damping)."""
    h = damped_hessian(hessian, percdamp)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def inverse_hessian_diag(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """[H^-1]_jj per input column, the quantity OBS / SparseGPT divide by.

    H^-1 = L^-T L^-1, so its diagonal is the column sums of (L^-1)^2; a triangular solve is much
    faster than ``cholesky_inverse`` on CPU.
    """
    factor = torch.linalg.cholesky(damped_hessian(hessian, percdamp))
    identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    inverse_factor = torch.linalg.solve_triangular(factor, identity, upper=False)
    return (inverse_factor * inverse_factor).sum(dim=0)
