"""Perplexity of several formulas under the search's one-shot fitness protocol (every linear pruned from
the dense model's cached calibration statistics, WikiText-2 valid windows), at each sparsity setting and
comparison group: a quick way to take a published metric apart (an exponent, one of its terms) before
spending the sequential driver's minutes per cell on it. Not a reported number: the search's own data.

Example: `python benchmarks/formula_compare.py --formulas 'wanda;ria;(rownorm(abs(W)) + colnorm(abs(W))) * X'
--settings 0.5,2:4 --groups row,matrix --fitness-windows 16`. A name from `primitives.known` stands for its
formula; N:M settings use the row group only (their groups lie inside rows)."""

from __future__ import annotations

from dataclasses import replace

import torch
from common import evaluator_parser, evaluator_settings, report

from pruning_core.errors import UsageError
from pruning_core.masks import parse_settings


def main() -> None:
    p = evaluator_parser(__doc__.splitlines()[0], nsamples=16, fitness_windows=16)
    p.add_argument(
        "--formulas", required=True, help="';'-separated formulas or known names (wanda, ria, ...)"
    )
    p.add_argument("--settings", default="0.5", help="comma list of sparsity settings: 0.5, 2:4, ...")
    p.add_argument("--groups", default="row", help="comma list: row, matrix")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU search uses 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from fitness.setup import build_evaluator, prepare_shipment
    from primitives.grammar import parse_formula
    from primitives.known import KNOWN_FORMULAS

    formulas = [f.strip() for f in args.formulas.split(";") if f.strip()]
    groups = [g for g in args.groups.split(",") if g]
    if not formulas or not groups or set(groups) - {"row", "matrix"}:
        p.error("--formulas needs at least one formula and --groups a comma list of row and matrix")
    try:  # before minutes of set-up: a typo fails at once
        settings_list = parse_settings(args.settings)
        for formula in formulas:
            parse_formula(KNOWN_FORMULAS.get(formula, formula))
    except UsageError as err:
        p.error(str(err))
    # the model, statistics and windows read once: only the setting and group differ between evaluators
    shipment = prepare_shipment(evaluator_settings(args), progress=not args.json)
    results = []
    for setting in settings_list:
        for group in groups if ":" not in setting else ["row"]:
            settings = replace(evaluator_settings(args), patterns=(setting,), group=group)
            evaluator = build_evaluator(settings, shipment=shipment)
            for formula in formulas:
                outcome = evaluator.evaluate_text(KNOWN_FORMULAS.get(formula, formula))
                results.append(
                    {
                        "setting": setting,
                        "group": group,
                        "formula": formula,
                        "ppl": round(outcome["fitness"], 2),
                        "reason": outcome.get("reason"),
                    }
                )
                if not args.json:
                    print(f"{setting} {group:6} {results[-1]['ppl']:>10} {formula}", flush=True)
            del evaluator
    if args.json:
        report({"results": results}, True)


if __name__ == "__main__":
    main()
