"""The rounds of SSRM and SER, the algorithm alone: no files, ranks or locks here.

SSRM (He et al. 2024, Algorithm 1), --filter=confidence:
    round 0:  train M_0 on the labeled pairs D_L
    round t:  pseudo-label the whole pool U with M_{t-1}; keep the pairs whose confidence
              max(P, 1 - P) >= 0.8; D_t = D_L + the kept pairs; train M_t from the initial model
SER (Huang et al. 2024, section 3), --filter=status:
    round t:  self-label what is left of U; keep the pairs of the learning status met (status 1,
              else status 2); they leave U and join every earlier selection: D_t = D_L + all
              selected; train M_t; stop when no status is met (converged)

`steps` does the heavy work (steps.py: train M_t, label the pool with the newest model);
`run` is the run folder (rundir.py): run.once(t, what, compute) returns what a finished round
saved, or computes and saves it, so a resumed run follows the path of one that never stopped.
The filters themselves are filters.py's (select, confidence_filter, learning_status).
"""
from selfrm.rundir import round_record


def self_train(cfg, steps, run, pool):
    """Round 0, then cfg.rounds rounds (fewer when SER converges); returns the rounds' records."""
    labeled = steps.labeled  # D_L (less the pairs held out to fit a temperature, --calibrate)
    run.once(0, "round", lambda: round_record(0, steps.train(0, labeled), [] if cfg.skip_initial_training else labeled))
    selected = {}  # SER: pool index -> (pseudo-label, its probability), accumulated over rounds
    previous = {}  # pool index -> its pseudo-label in the last round (--keep_stable)
    for t in range(1, cfg.rounds + 1):
        remaining = [i for i in range(len(pool)) if i not in selected]  # SSRM: the whole pool, every round
        # pseudo-label with M_{t-1} and filter (selfrm/filters.py: select)
        rows, summary = run.once(t, "pool", lambda: steps.label(remaining, previous))
        previous = {row["pool_index"]: row["pseudo_label"] for row in rows}
        kept = kept_pairs(rows)
        if cfg.filter == "status":
            if summary["status_met"] == "converged":  # no status is met: SER stops, no new model
                run.once(t, "round", lambda: round_record(t, None, labeling=(remaining, summary)))
                break
            selected.update(kept)
            kept = selected
        # D_t = D_L + the pseudo-labeled pairs (SSRM: this round's; SER: every round's)
        train_pairs = labeled + [pool[i].as_pair(label, prob if cfg.soft_labels else 1.0)
                                 for i, (label, prob) in sorted(kept.items())]
        run.once(t, "round", lambda: round_record(t, steps.train(t, train_pairs), train_pairs, pool, kept,
                                                  (remaining, summary)))
    return run.rounds


def kept_pairs(rows):
    """{pool index: (pseudo-label, P(the response it names is better))} of the kept rows of a
    labeled round; the probability is the (calibrated) P(a1 > a2) or 1 minus it, whatever
    chose the label (the argmax, or a gold label with --label_source=gold)."""
    selected = {}
    for row in rows:
        if row["keep"]:
            p_a = row.get("prob_a_calibrated", row["prob_a"])
            selected[row["pool_index"]] = (row["pseudo_label"], p_a if row["pseudo_label"] == "a" else 1.0 - p_a)
    return selected
