"""Reproduce the demo's table: both variants (SSRM: pm + confidence; SER: rm + status) for
three seeds, mean and standard deviation per round.

    python bench/reproduce.py [--seeds=0,1,2]

Writes bench/results/demo.json and bench/results/demo.md (the table the README shows).
Each run is exactly `python train.py [--model_type=rm --filter=status] --seed=S`.
"""
import contextlib
import io
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import train  # noqa: E402
from selfrm.files import atomic_path, write_json  # noqa: E402

VARIANTS = {"ssrm (pm + confidence)": [], "ser (rm + status)": ["--model_type=rm", "--filter=status"]}
COLUMNS = ["train_size", "pseudo_labeled_share", "pseudo_label_accuracy", "eval_accuracy"]


def run(argv, seed, out_root):
    argv = argv + [f"--seed={seed}", f"--out_dir={out_root}/{'-'.join(a.split('=')[1] for a in argv) or 'pm'}-seed{seed}"]
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rounds = train.main(train.settings_from_argv(argv))
    print(f"  {' '.join(argv)}: {[r.get('eval_accuracy') for r in rounds]} ({time.time() - start:.0f}s)", flush=True)
    return rounds


def aggregate(runs):
    """Per round (0..3, 'full'): mean and std over seeds of each column; a round that a
    seed did not train (SER converged) counts in `seeds_trained` only."""
    labels = []
    for rounds in runs:
        labels += [r["round"] for r in rounds if r["round"] not in labels]
    table = []
    for label in labels:
        rows = [r for rounds in runs for r in rounds if r["round"] == label and r.get("eval_accuracy") is not None]
        entry = {"round": label, "seeds_trained": len(rows)}
        for col in COLUMNS:
            values = [r[col] for r in rows if r.get(col) is not None]
            if values:
                entry[col] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        table.append(entry)
    return table


def markdown(results):
    lines = []
    for variant, table in results["variants"].items():
        lines += [f"**{variant}**", "", "| round | seeds | train size | pseudo-labeled share | pseudo-label acc | eval acc |",
                  "|---|---|---|---|---|---|"]
        for e in table:
            cell = lambda c, pct=True: (f"{100 * e[c]['mean']:.1f} ± {100 * e[c]['std']:.1f}" if pct else
                                        f"{e[c]['mean']:.0f}") if c in e else ""
            lines.append(f"| {e['round']} | {e['seeds_trained']} | {cell('train_size', False)} | "
                         f"{cell('pseudo_labeled_share')} | {cell('pseudo_label_accuracy')} | {cell('eval_accuracy')} |")
        lines.append("")
    return "\n".join(lines)


def main():
    seeds = [0, 1, 2]
    for arg in sys.argv[1:]:
        if arg.startswith("--seeds="):
            seeds = [int(s) for s in arg.split("=", 1)[1].split(",")]
        else:
            sys.exit(f"unknown argument {arg!r} (only --seeds=0,1,2)")
    out_root = os.path.join("runs", "reproduce")
    results = {"command": "python bench/reproduce.py", "seeds": seeds, "variants": {}, "runs": {}}
    start = time.time()
    for variant, argv in VARIANTS.items():
        print(variant, flush=True)
        runs = [run(list(argv), seed, out_root) for seed in seeds]
        results["runs"][variant] = runs
        results["variants"][variant] = aggregate(runs)
    results["seconds"] = time.time() - start
    write_json(os.path.join(HERE, "results", "demo.json"), results)
    with atomic_path(os.path.join(HERE, "results", "demo.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
