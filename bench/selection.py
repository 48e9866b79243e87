"""Rank the selection rules: the papers' filters against the rules beyond them (README,
"Selection rules beyond the papers"), on the demo's task and on a harder variant of it.

    python bench/selection.py [--seeds=0,1,2] [--workers=2] [--variants=demo,few_labels]

Each run is `python train.py` on the demo's files (selfrm/toy.py, the demo's settings, 3
rounds) with one rule's flags; a rule's row is the mean ± std over seeds of the last trained
round's eval accuracy, its gain over round 0, the accuracy of its training pseudo-labels and
the kept share of its labeling, the mean order disagreement over the labeled rounds (pm), and
the fitted T.

Variants:
  demo        the demo as `python train.py` runs it: 250 labeled pairs, a pool of 2250.
  few_labels  the first 60 of those labeled pairs only, the same pool: round 0 learns from
              a quarter of the labels, so it starts weaker and its probabilities are further
              from calibrated (the fitted T of round 0 says how far). Fewer labels rather than
              noisier clusters: it is the case a user of self-training is in, and it changes
              nothing in the task itself.
With --calibrate=temperature, a fifth of the labeled pairs is held out to fit T on (50 of
250; 12 of 60): those runs train round 0 on fewer gold labels than the others, a cost of the
rule that the table includes.

Runs are independent processes (--workers at a time, one thread each); a run that finished
before is read back from its manifest (train.py resumes), so a rerun only runs what is missing.
Writes bench/results/selection.json and bench/results/selection.md.
"""
import argparse
import contextlib
import io
import json
import multiprocessing
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from selfrm import toy  # noqa: E402
from selfrm.files import atomic_path, write_json, write_jsonl  # noqa: E402

VARIANTS = {"demo": 250, "few_labels": 60}  # labeled pairs
RULES = {  # (model kind, rule name) -> train.py flags; the first of each kind is the paper's
    ("pm", "confidence (SSRM)"): ["--filter=confidence"],
    ("pm", "confidence + temperature"): ["--filter=confidence", "--calibrate=temperature"],
    ("pm", "confidence + stable"): ["--filter=confidence", "--keep_stable=true"],
    ("pm", "confidence + soft"): ["--filter=confidence", "--soft_labels=true"],
    ("pm", "consistent"): ["--filter=consistent"],
    # at threshold 0.8 consistency adds nothing: orders that disagree average below 0.75 (see
    # the README); at 0.6 it can drop pairs that the confidence filter keeps
    ("pm", "confidence at 0.6"): ["--filter=confidence", "--threshold=0.6"],
    ("pm", "consistent at 0.6"): ["--filter=consistent", "--threshold=0.6"],
    ("rm", "status (SER)"): ["--filter=status"],
    ("rm", "status + soft"): ["--filter=status", "--soft_labels=true"],
    ("rm", "confidence"): ["--filter=confidence"],
    ("rm", "confidence + temperature"): ["--filter=confidence", "--calibrate=temperature"],
    ("rm", "confidence + stable"): ["--filter=confidence", "--keep_stable=true"],
    ("rm", "confidence + soft"): ["--filter=confidence", "--soft_labels=true"],
}


def data_files(root, variant, seed):
    """The demo's files for `seed`, the labeled file cut to the variant's size."""
    folder = os.path.join(root, "data", f"seed{seed}")
    files = toy.write_demo_data(folder, seed)
    labeled = os.path.join(folder, f"labeled-{variant}.jsonl")
    if not os.path.exists(labeled):
        with open(files["labeled"]) as f:
            rows = [json.loads(line) for line in f][:VARIANTS[variant]]
        write_jsonl(labeled, rows)
    return {"train_file": labeled, "unlabeled_file": files["pool"], "eval_file": files["eval"]}


def run_one(job):
    """One train.py run, in this worker process; returns (job, its manifest's rounds, seconds)."""
    import torch
    torch.set_num_threads(1)
    import train
    variant, kind, rule, seed, root = job
    defaults = toy.demo_defaults(kind, "confidence")
    files = data_files(root, variant, seed)
    argv = [f"--{k}={v}" for k, v in defaults.items() if k != "out_dir"]
    argv += [f"--{k}={v}" for k, v in files.items()]
    argv += [f"--model_type={kind}", f"--seed={seed}", *RULES[kind, rule]]
    if "--calibrate=temperature" in argv:
        argv.append(f"--calibration_pairs={VARIANTS[variant] // 5}")
    slug = rule.split(" (")[0].replace(" + ", "+").replace(" at ", "@").replace(" ", "_")
    argv.append(f"--out_dir={root}/{variant}/{kind}-{slug}/seed{seed}")
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train.main(train.settings_from_argv(argv))
    with open(os.path.join(argv[-1].split("=", 1)[1], "manifest.json")) as f:
        rounds = json.load(f)["rounds"]
    return job, rounds, time.time() - start


def summarize(rounds_of_seeds):
    """One rule's row: mean and std over seeds."""
    def stat(values):
        values = [v for v in values if v is not None]
        return [float(np.mean(values)), float(np.std(values))] if values else None
    # the last round that trained a model (a SER round that converged trains none)
    last = [rounds[-1] if rounds[-1].get("eval_accuracy") is not None else rounds[-2] for rounds in rounds_of_seeds]
    labeled = [[r for r in rounds if r["round"] > 0] for rounds in rounds_of_seeds]
    return {
        "seeds": len(rounds_of_seeds),
        "eval_accuracy": stat([r["eval_accuracy"] for r in last]),
        "gain": stat([r["eval_accuracy"] - rounds[0]["eval_accuracy"] for r, rounds in zip(last, rounds_of_seeds)]),
        "round0_accuracy": stat([rounds[0]["eval_accuracy"] for rounds in rounds_of_seeds]),
        "pseudo_label_accuracy": stat([r.get("pseudo_label_accuracy") for r in last]),
        "kept_share": stat([r["kept"] / r["pool_size"] for r in last if r["round"] > 0]),
        "order_disagreement": stat([float(np.mean([r["order_disagreement"] for r in rs])) for rs in labeled
                                    if rs and "order_disagreement" in rs[0]]),
        "temperature_round0": stat([rounds[0].get("temperature") for rounds in rounds_of_seeds]),
        "temperature_last": stat([r.get("temperature") for r in last]),
        "rounds_trained": stat([sum("model" in r for r in rounds) - 1 for rounds in rounds_of_seeds]),
    }


def cell(value, scale=100.0, digits=1):
    if value is None:
        return ""
    return f"{value[0] * scale:.{digits}f} ± {value[1] * scale:.{digits}f}"


def table(results, variant):
    lines = [f"**{variant}** ({VARIANTS[variant]} labeled pairs, pool 2250, eval 1000; "
             f"{next(iter(results.values()))['seeds']} seeds, last round)", "",
             "| model | rule | eval acc | gain over round 0 | pseudo acc | kept share | order disagreement | T (round 0 → last) |",
             "|---|---|---|---|---|---|---|---|"]
    for (kind, rule), row in results.items():
        t = "" if row["temperature_round0"] is None else \
            f"{cell(row['temperature_round0'], 1, 2)} → {cell(row['temperature_last'], 1, 2)}"
        lines.append(f"| {kind} | {rule} | {cell(row['eval_accuracy'])} | {cell(row['gain'])} | "
                     f"{cell(row['pseudo_label_accuracy'])} | {cell(row['kept_share'])} | "
                     f"{cell(row['order_disagreement'])} | {t} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out_root", default="runs/bench-selection")
    parser.add_argument("--results", default=os.path.join(HERE, "results", "selection"))
    args = parser.parse_args()
    seeds, variants = [int(s) for s in args.seeds.split(",")], args.variants.split(",")
    root = os.path.abspath(args.out_root)
    for variant in variants:  # written once, before the workers read them
        for seed in seeds:
            data_files(root, variant, seed)
    jobs = [(v, kind, rule, s, root) for v in variants for (kind, rule) in RULES for s in seeds]
    runs, start = {}, time.time()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for job, rounds, seconds in pool.imap_unordered(run_one, jobs):
            runs[job[:4]] = rounds
            print(f"[{len(runs)}/{len(jobs)}] {job[0]} {job[1]} {job[2]} seed {job[3]}: eval "
                  f"{[r.get('eval_accuracy') for r in rounds]} ({seconds:.0f}s)", flush=True)
    results = {v: {(kind, rule): summarize([runs[v, kind, rule, s] for s in seeds]) for kind, rule in RULES}
               for v in variants}
    text = "\n\n".join(table(results[v], v) for v in variants)
    print("\n" + text + f"\n\n({len(jobs)} runs in {time.time() - start:.0f}s)")
    with atomic_path(args.results + ".md") as tmp, open(tmp, "w") as f:
        f.write(text + "\n")
    write_json(args.results + ".json", {"seeds": seeds, "rules": {f"{k} | {r}": flags for (k, r), flags in RULES.items()},
                                        "results": {v: {f"{k} | {r}": row for (k, r), row in results[v].items()}
                                                    for v in variants},
                                        "runs": {" | ".join(map(str, key)): rounds for key, rounds in runs.items()}})


if __name__ == "__main__":
    main()
