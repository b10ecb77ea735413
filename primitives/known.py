"""Published pruning metrics written in the formula language (``x^c`` means |x|^c)."""

KNOWN_FORMULAS: dict[str, str] = {
    "magnitude": "abs(W)",
    "wanda": "abs(W) * X",
    "pruner-zero": "sqr(W) * mms(G)",
    "ria": "(rownorm(abs(W)) + colnorm(abs(W))) * sqrt(X)",
    "sparsegpt-mask": "sqr(W) / sqr(H)",
    # Z-Pruner: a*|z_row|^3 + (1 - a)*|z_col|^3 with a = 0.7 (1 - 0.3 rho), times ||X_j||^1.5.
    "z-pruner": (
        "(0.7 * (1 - 0.3 * lowfrac(W)) * zsn(rowl2(W))^3"
        " + (1 - 0.7 * (1 - 0.3 * lowfrac(W))) * zsn(coll2(W))^3) * X^1.5"
    ),
}
