"""Training throughput of a scalar reward model (pairs/s), side by side in one process:
selfrm's training loop (selfrm.trainer.train) against TRL's RewardTrainer and against a bare
forward/backward/step loop, on the same model, data, batch size (16 pairs), precision (fp32)
and LoRA setting (off: full fine-tuning).

    pip install trl   # for this benchmark only
    python bench/train_throughput.py [--steps=12] [--tokens=256]

Model: LlamaForSequenceClassification, hidden 256, 4 layers, 32k vocabulary, random weights.
Data: random token ids, 200-300 tokens per response (pre-tokenized for all three). Each
method runs twice from the same initial weights; the faster run counts. selfrm's final model
save is switched off here, since the other two do not save.
"""
import copy
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from selfrm import toy, trainer  # noqa: E402
from selfrm.sharing import pad_right  # noqa: E402
from selfrm.dist import Dist  # noqa: E402
from selfrm.modeling import RewardModel  # noqa: E402
from selfrm.settings import TrainSettings, make  # noqa: E402

BATCH, LR = 16, 1e-5


def arg(name, default):
    for a in sys.argv[1:]:
        if a.startswith(f"--{name}="):
            return int(a.split("=", 1)[1])
    return default


def data(n, tokens, seed=0):
    rng = np.random.default_rng(seed)
    seq = lambda: rng.integers(1, 32000, size=int(rng.integers(tokens - 56, tokens + 45))).tolist()
    return [{"chosen_ids": seq(), "rejected_ids": seq(), "margin": 0.0} for _ in range(n)]


def run_selfrm(model, examples, steps):
    cfg = make(TrainSettings, model_type="rm", global_batch_size=BATCH, micro_batch_size=BATCH, max_steps=steps,
               lr=LR, warmup_steps=0, schedule="constant", log_every=steps, save_every=0, dtype="fp32")
    real_save, trainer.save_model = trainer.save_model, lambda *a, **k: None
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer.train(cfg, RewardModel(model), toy.build_tokenizer(), examples, run_dir, Dist())
    finally:
        trainer.save_model = real_save


def run_bare(model, examples, steps):
    """The least a loop can do: pad, one forward of chosen+rejected, loss, backward, clip, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = examples[step * BATCH:(step + 1) * BATCH]
        ids, mask = pad_right([e["chosen_ids"] for e in batch] + [e["rejected_ids"] for e in batch], 0)
        rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        chosen, rejected = rewards.chunk(2)
        (-F.logsigmoid(chosen - rejected)).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_trl(model, examples, steps):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                            logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                            fp16=False, dataloader_num_workers=0, max_length=None, seed=0)
        dataset = Dataset.from_dict({"chosen_ids": [e["chosen_ids"] for e in examples[:steps * BATCH]],
                                     "rejected_ids": [e["rejected_ids"] for e in examples[:steps * BATCH]]})
        RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=toy.build_tokenizer()).train()


def main():
    steps, tokens = arg("steps", 12), arg("tokens", 256)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, num_labels=1,
                         pad_token_id=0)
    base = LlamaForSequenceClassification(config)
    examples = data(steps * BATCH, tokens)
    methods = {"bare loop": run_bare, "selfrm": run_selfrm}
    if importlib.util.find_spec("trl"):
        methods["TRL RewardTrainer"] = run_trl
    else:
        print("trl is not installed (pip install trl): skipping the TRL comparison")
    best = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {steps} steps of {BATCH} pairs, "
          f"~{tokens} tokens per response, fp32, full fine-tuning", flush=True)
    for attempt in range(2):
        for name, fn in methods.items():
            model = copy.deepcopy(base)
            start = time.perf_counter()
            fn(model, examples, steps)
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, float("inf")), seconds)
            print(f"  run {attempt + 1}: {name:18s} {steps * BATCH / seconds:6.2f} pairs/s", flush=True)
    rate = {k: steps * BATCH / v for k, v in best.items()}
    print(f"selfrm {rate['selfrm']:.2f} pairs/s = {rate['selfrm'] / rate['bare loop']:.3f} of the bare loop "
          f"(target >= 0.85)")
    if "TRL RewardTrainer" in rate:
        print(f"selfrm / TRL RewardTrainer: {rate['selfrm'] / rate['TRL RewardTrainer']:.2f}x (target >= 1.2x)")


if __name__ == "__main__":
    main()
