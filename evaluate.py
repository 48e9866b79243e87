"""Evaluate a reward model on labeled pairs: accuracy, RewardBench sections, calibration.

    python evaluate.py --model=D/model --eval_file=E.jsonl [--out_file=metrics.json] \
        [--predictions_file=P.jsonl]

Rows are {prompt, chosen, rejected} with optional `subset` (RewardBench's subset names give
its four sections and scores) and `id`. A pairwise model is scored in both orders (a tie
counts 0.5); a scalar model is right only when r_chosen > r_rejected. With matplotlib
installed, --out_file=M.json also writes M.png (reliability diagram and histogram).
"""
import os

from selfrm import dist
from selfrm.formats import load_pairs
from selfrm.files import dump_json, dump_jsonl, publish_together
from selfrm.metrics import evaluate_scores
from selfrm.modeling import check_outputs, resolve_max_length, resolve_model_type
from selfrm.scoring import encode_pairs, score_pairs
from selfrm.settings import EvalSettings, SettingsError, cli, parse_args
from selfrm.steps import scoring_model


def main(cfg):
    if not cfg.eval_file:
        raise SettingsError("--eval_file is required")
    # ---------------------------------------------------------------- settings and data, checked before any write
    cfg.model_type = resolve_model_type(cfg)
    resolve_max_length(cfg)
    plot_path = os.path.splitext(cfg.out_file)[0] + ".png" if cfg.out_file and cfg.plot else ""
    check_outputs({"out_file": cfg.out_file, "predictions_file": cfg.predictions_file, "plot": plot_path},
                  [cfg.eval_file])
    pairs = load_pairs(cfg.eval_file, cfg.format, cfg.bad_rows)
    if cfg.limit > 0:
        pairs = pairs[:cfg.limit]
    # ---------------------------------------------------------------- init, model
    world = dist.compute_init(cfg.dist_timeout_s)
    try:
        model, tokenizer = scoring_model(cfg, world, cfg.model)
        # ------------------------------------------------------------ score
        cuts = {}
        scores = score_pairs(cfg, world, model, tokenizer, pairs, encode_pairs(cfg, tokenizer, pairs, cuts))
        subsets = [str(p.extra.get("subset", "all")) for p in pairs]
        metrics, correct = evaluate_scores(scores, cfg.model_type, subsets)
        metrics.update(model=cfg.model, model_type=cfg.model_type, eval_file=cfg.eval_file, max_length=cfg.max_length,
                       truncated=cuts["truncated"])
        # ------------------------------------------------------------ report and write
        if world.master:  # metrics, predictions and plot appear together
            print(report(metrics))
            writes = []
            if cfg.out_file:
                writes.append((cfg.out_file, lambda tmp: dump_json(tmp, metrics)))
            if plot_path and plotter():
                writes.append((plot_path, lambda tmp: plot(metrics, tmp)))
            if cfg.predictions_file:
                rows = [{"id": p.extra.get("id", i), "subset": s, "prob_chosen": float(pc), "correct": float(c)}
                        for i, (p, s, pc, c) in enumerate(zip(pairs, subsets, scores["prob_a"], correct))]
                writes.append((cfg.predictions_file, lambda tmp: dump_jsonl(tmp, rows)))
            publish_together(writes)
        return metrics
    finally:
        dist.compute_cleanup()


def report(m):
    """The metrics as a readable table."""
    lines = [f"accuracy {m['accuracy']:.4f} on {m['n']} pairs ({m['model_type']})"]
    if len(m["subsets"]) > 1:
        lines += ["", "| subset | n | accuracy |", "|---|---|---|"]
        lines += [f"| {s} | {v['n']} | {v['accuracy']:.4f} |" for s, v in m["subsets"].items()]
    if m["sections"]:
        lines += ["", "| section | score |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in m["sections"].items()]
        for key in ("mean_of_sections", "prior_sets", "leaderboard_score"):
            if key in m:
                lines.append(f"| {key} | {m[key]:.4f} |")
    c = m["calibration"]
    lines += ["", f"ECE {c['ece']:.4f} | Brier {c['brier']:.4f} | NLL {c['nll']:.4f}", "",
              "| confidence bin | count | mean confidence | accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['bin']} | {r['count']} | {r['confidence']:.4f} | {r['accuracy']:.4f} |" for r in c["reliability"]]
    edges, counts = c["histogram"]["edges"], c["histogram"]["counts"]
    widest = max(counts) or 1
    lines += ["", "P(chosen) histogram:"] + [f"  {edges[i]:.1f}-{edges[i + 1]:.1f} {counts[i]:6d} {'#' * round(40 * counts[i] / widest)}"
                                             for i in range(len(counts))]
    return "\n".join(lines)


def plotter():
    """matplotlib's pyplot, or None (with a note) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the table above has the same numbers)")
        return None
    return plt


def plot(m, path):
    """Reliability diagram and P histogram as a PNG at `path`."""
    plt = plotter()
    c = m["calibration"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect calibration")
    left.plot([r["confidence"] for r in c["reliability"]], [r["accuracy"] for r in c["reliability"]], "o-", label="model")
    left.set(xlabel="confidence max(P, 1-P)", ylabel="accuracy", title=f"reliability (ECE {c['ece']:.3f})")
    left.legend()
    edges = c["histogram"]["edges"]
    right.bar(edges[:-1], c["histogram"]["counts"], width=edges[1] - edges[0], align="edge", edgecolor="k")
    right.set(xlabel="P(chosen)", ylabel="pairs", title="probability of the true label")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    cli(main, lambda: parse_args(EvalSettings))
