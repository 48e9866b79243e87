"""Labeling throughput (pairs/s), measured side by side in one process on one model:

1. selfrm's path (score_encoded: both orders in one batch, sorted by length, LM head only at
   the label position and only for the rows of A and B) against a naive scorer written the
   way published pair-pm evaluation scripts do it: one pair at a time, two forwards for the
   two orders, full logits at every position.
2. selfrm against the model's bare forward (the backbone alone, no head) on the same padded,
   length-sorted batches: the bound of any scorer.
3. Scaling: selfrm's labeling time for pools of 1x, 2x, 4x pairs.

    python bench/label_throughput.py [--pairs=48] [--tokens=500]

Model: a Llama config with hidden 256, 4 layers, a 32k vocabulary, fp32, random weights (the
numbers do not depend on the weights). Sequences: random ids, 400-600 tokens each order.
"""
import os
import sys
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from selfrm.sharing import pad_right  # noqa: E402
from selfrm.dist import Dist  # noqa: E402
from selfrm.modeling import PreferenceModel  # noqa: E402
from selfrm.scoring import score_encoded  # noqa: E402

A, B = 10, 11


def arg(name, default):
    for a in sys.argv[1:]:
        if a.startswith(f"--{name}="):
            return int(a.split("=", 1)[1])
    return default


def make_pool(n, tokens, seed=0):
    """n pairs; each as (ids of order (a, b), ids of order (b, a)), like Encoder.encode_score."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        length = int(rng.integers(tokens - 100, tokens + 101))
        ids = rng.integers(100, 32000, size=length).tolist()
        pool.append((ids, ids[::-1]))
    return pool


@torch.inference_mode()
def naive(hf, pool):
    """One pair at a time, two forwards, full logits at every position."""
    probs = []
    for first, second in pool:
        p = []
        for ids in (first, second):
            logits = hf(torch.tensor([ids])).logits  # (1, T, V)
            p.append(logits[0, -1, [A, B]].float().softmax(-1))
        probs.append(float((p[0][0] + p[1][1]) / 2))
    return np.array(probs)


@torch.inference_mode()
def bare(hf, pool, batch_size):
    """The backbone alone on the batches selfrm builds (longest first, padded to the batch)."""
    order = sorted(range(len(pool)), key=lambda i: -max(len(pool[i][0]), len(pool[i][1])))
    for b in range(0, len(order), batch_size):
        ids, mask = pad_right([s for i in order[b:b + batch_size] for s in pool[i]], 0)
        hf.base_model(input_ids=ids, attention_mask=mask)


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    n, tokens, batch_size = arg("pairs", 48), arg("tokens", 500), arg("batch_size", 8)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    hf = LlamaForCausalLM(config).eval()
    model = PreferenceModel(hf).eval()
    pool = make_pool(n, tokens)
    world, label_ids = Dist(), {"A": A, "B": B}
    ours = lambda p: score_encoded(model, p, 0, label_ids, world, batch_size, desc="selfrm")["prob_a"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n} pairs of ~{tokens} tokens per order, "
          f"batch {batch_size} pairs")
    ours(pool[:4])  # warm-up
    t_ours, p_ours = timed(lambda: ours(pool), 2)
    t_naive, p_naive = timed(lambda: naive(hf, pool))
    t_bare, _ = timed(lambda: bare(hf, pool, batch_size), 2)
    np.testing.assert_allclose(p_ours, p_naive, atol=1e-4)  # the same probabilities, faster
    print(f"1. selfrm {n / t_ours:.2f} pairs/s, naive {n / t_naive:.2f} pairs/s: speed-up {t_naive / t_ours:.2f}x "
          f"(target >= 2.5x)")
    print(f"2. bare forward on the same batches {n / t_bare:.2f} pairs/s: selfrm runs at {t_bare / t_ours:.3f} of it "
          f"(target >= 0.85)")
    times = []
    for k in (1, 2, 4):
        big = make_pool(n * k, tokens, seed=k)
        times.append(timed(lambda: ours(big))[0])
        print(f"3. {n * k:4d} pairs: {times[-1]:.2f}s ({times[-1] / times[0]:.2f}x the 1x time; linear = {k}x)")


if __name__ == "__main__":
    main()
