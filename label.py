"""Pseudo-label a file of unlabeled pairs with a trained reward model, and filter them.

    python label.py --model=D/model --unlabeled_file=U.jsonl --out_file=L.jsonl \
        [--filter=confidence|status|consistent|none] [--threshold=0.8] [--temperature=1] [--emit=rows|pairs]

Each output row is the input row plus prob_a, confidence, pseudo_label and keep (for a
pairwise model prob_a_orders, P(a1 > a2) in each A/B order; for a scalar model score_a,
score_b; with --filter=status the status that selected it; with --temperature other than 1
prob_a_calibrated, which confidence and the filter then use).
--emit=pairs writes the kept rows as {prompt, chosen, rejected} instead: training data.
A summary goes to stdout and to L.summary.json. Works under torchrun (sharded scoring).
"""
import json

from selfrm import dist
from selfrm.checks import check_filter, check_gold
from selfrm.formats import chosen_rejected, load_unlabeled
from selfrm.modeling import check_outputs, resolve_max_length, resolve_model_type
from selfrm.rundir import summary_path, write_rows_and_summary
from selfrm.scoring import relabel
from selfrm.settings import LabelSettings, SettingsError, cli, parse_args
from selfrm.steps import scoring_model


def main(cfg):
    if not cfg.unlabeled_file or not cfg.out_file:
        raise SettingsError("--unlabeled_file and --out_file are required")
    # ---------------------------------------------------------------- settings and data, checked before any write
    cfg.model_type = resolve_model_type(cfg)
    resolve_max_length(cfg)
    check_outputs({"out_file": cfg.out_file, "summary": summary_path(cfg.out_file)}, [cfg.unlabeled_file])
    pool = load_unlabeled(cfg.unlabeled_file, cfg.format, cfg.as_unlabeled, cfg.seed, cfg.bad_rows)
    check_filter(cfg)
    check_gold(cfg, pool)
    # ---------------------------------------------------------------- init, model
    world = dist.compute_init(cfg.dist_timeout_s)
    try:
        model, tokenizer = scoring_model(cfg, world, cfg.model)
        # ------------------------------------------------------------ score, filter
        rows, summary = relabel(cfg, world, model, tokenizer, pool, temperature=cfg.temperature)
        # ------------------------------------------------------------ write: rows and summary together
        if world.master:
            write_rows_and_summary(cfg.out_file, as_pairs(rows) if cfg.emit == "pairs" else rows, summary)
            print(json.dumps(summary, indent=2))
        return rows, summary
    finally:
        dist.compute_cleanup()


def as_pairs(rows):
    """Kept rows as training pairs {prompt, chosen, rejected}, the pseudo-label deciding."""
    pairs = []
    for row in (r for r in rows if r["keep"]):
        chosen, rejected = chosen_rejected(row["response_a"], row["response_b"], row["pseudo_label"])
        pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


if __name__ == "__main__":
    cli(main, lambda: parse_args(LabelSettings))
