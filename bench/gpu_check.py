"""What only a CUDA GPU shows, in one short run: CUDA AMP (bf16, and fp16 with GradScaler and
gradient clipping) against fp32 on the same training steps, training and labeling throughput,
peak GPU memory with and without gradient checkpointing, and a torchrun launch through NCCL.

    python bench/gpu_check.py ASSETS OUT

ASSETS holds `tokenizer/` (SmolLM2's tokenizer, saved as a plain fast-tokenizer folder) and
UltraFeedback's `ultrafeedback-binarized-1k-train.jsonl` / `-200-eval.jsonl` (copies of
../shared/data). The model is SmolLM2-135M's architecture (Llama, grouped-query attention, tied
embeddings) built from its config with random weights and saved with `"dtype": "bfloat16"`, as
hub checkpoints are: the numbers below are about the code's GPU paths and speed, not accuracy.
"""
import json
import os
import subprocess
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv  # a tiny model and few steps: checks the script itself on a CPU
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_model(assets, folder, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(assets, "tokenizer"))
    size = dict(hidden_size=72, intermediate_size=128, num_hidden_layers=2) if SMOKE else \
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    config = LlamaConfig(vocab_size=len(tokenizer), **size,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, dtype="bfloat16",
                         pad_token_id=tokenizer.pad_token_id, num_labels=1)
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if kind == "pm" else AutoModelForSequenceClassification
    auto.from_config(config, dtype=torch.float32).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_in_process(settings):
    """train.main in this process; returns (seconds, peak GPU bytes, the log rows)."""
    import train
    from selfrm.settings import TrainSettings, make
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    train.main(make(TrainSettings, **settings))
    torch.cuda.synchronize()
    rows = [json.loads(line) for line in open(os.path.join(settings["out_dir"], "train_log.jsonl"))]
    return time.time() - start, torch.cuda.max_memory_allocated(), rows


def main(assets, out):
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    data = os.path.join(assets, "ultrafeedback-binarized-1k-train.jsonl")
    evals = os.path.join(assets, "ultrafeedback-binarized-200-eval.jsonl")
    pm = build_model(assets, os.path.join(out, "pm-base"), "pm")
    rm = build_model(assets, os.path.join(out, "rm-base"), "rm")
    common = dict(model=pm, train_file=data, max_length=128 if SMOKE else 1024, global_batch_size=32,
                  micro_batch_size=8, max_steps=2 if SMOKE else 12, bad_rows="skip", lr=1e-5, warmup_steps=2, grad_clip=1.0, log_every=1, save_every=0)
    # ---- AMP: the same 12 steps (same batches) in fp32, bf16 and fp16 + GradScaler
    for dtype in ("fp32", "bf16", "fp16"):
        seconds, peak, rows = train_in_process({**common, "dtype": dtype, "out_dir": os.path.join(out, f"pm-{dtype}")})
        report[f"pm_{dtype}"] = {"seconds": seconds, "peak_gb": peak / 1e9, "losses": [r["loss"] for r in rows],
                                 "tokens_per_s_last": rows[-1]["tokens_per_s"]}
    for dtype in ("bf16", "fp16"):
        diff = [abs(a - b) for a, b in zip(report[f"pm_{dtype}"]["losses"], report["pm_fp32"]["losses"])]
        report[f"pm_{dtype}"]["max_abs_loss_diff_vs_fp32"] = max(diff)
    # ---- gradient checkpointing: peak memory, bf16, longer micro-batches
    for ckpt in (False, True):
        seconds, peak, rows = train_in_process({**common, "dtype": "bf16", "max_steps": 4, "micro_batch_size": 16,
                                                "gradient_checkpointing": ckpt,
                                                "out_dir": os.path.join(out, f"pm-ckpt-{ckpt}")})
        report[f"pm_bf16_micro16_checkpointing_{ckpt}"] = {"peak_gb": peak / 1e9,
                                                           "tokens_per_s_last": rows[-1]["tokens_per_s"]}
    report["checkpointing_peak_ratio"] = (report["pm_bf16_micro16_checkpointing_True"]["peak_gb"] /
                                          max(report["pm_bf16_micro16_checkpointing_False"]["peak_gb"], 1e-9))
    # ---- SER's scalar model, bf16
    seconds, peak, rows = train_in_process({**common, "model": rm, "model_type": "rm", "dtype": "bf16",
                                            "out_dir": os.path.join(out, "rm-bf16")})
    report["rm_bf16"] = {"seconds": seconds, "peak_gb": peak / 1e9, "losses": [r["loss"] for r in rows],
                         "tokens_per_s_last": rows[-1]["tokens_per_s"]}
    # ---- labeling throughput (label.py, bf16 autocast, both orders of each pair)
    pool = os.path.join(out, "pool.jsonl")
    with open(data) as f, open(pool, "w") as g:
        for line in list(f)[:20 if SMOKE else 400]:
            row = json.loads(line)
            g.write(json.dumps({"prompt": row["prompt"], "response_a": row["chosen"], "response_b": row["rejected"]}) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.time()
    done = subprocess.run([sys.executable, "label.py", f"--model={os.path.join(out, 'pm-bf16', 'model')}",
                           f"--unlabeled_file={pool}", f"--out_file={os.path.join(out, 'labeled.jsonl')}",
                           "--batch_size=32"], cwd=ROOT, env=env, capture_output=True, text=True)
    report["label_400_pairs"] = {"returncode": done.returncode, "seconds_with_load": time.time() - start,
                                 "stderr_tail": done.stderr[-800:]}
    # ---- torchrun through NCCL (one GPU: one rank; the collectives, init and teardown still run)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29612",
                           "train.py", f"--model={pm}", f"--train_file={data}", "--bad_rows=skip", "--max_steps=3", "--max_length=512",
                           "--global_batch_size=8", "--micro_batch_size=4", f"--eval_file={evals}",
                           f"--out_dir={os.path.join(out, 'torchrun')}"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    report["torchrun_nccl_one_rank"] = {"returncode": done.returncode, "stdout_tail": done.stdout[-600:],
                                        "stderr_tail": done.stderr[-600:]}
    print(json.dumps(report, indent=2))
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    if SMOKE:  # stand-ins for what only CUDA has
        torch.cuda.get_device_name = lambda: "cpu (smoke)"
        torch.cuda.empty_cache = torch.cuda.reset_peak_memory_stats = torch.cuda.synchronize = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
    main(sys.argv[1], sys.argv[2])
