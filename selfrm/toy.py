"""The built-in demo: a synthetic preference task, its word-level tokenizer and a tiny Llama.

The task (seeded, generated here, no download):
- The response vocabulary is split into `n_clusters` clusters of `words_per_cluster` words.
  Cluster c has a hidden quality c (0 = worst). Inside a cluster, word frequencies follow a
  Zipf law: a few head words are common, the tail words are rare.
- A response picks one cluster and draws `response_length` words from it (Zipf weights).
- A pair holds two responses from two different clusters; the response from the cluster of
  higher quality is preferred. The prompt is a few topic words that do not matter.

Why unlabeled pairs help: with few labels a model learns the head words of each cluster,
but rarely sees the tail words (with the demo's sizes, 30 of the 192 words appear at most
twice among the 250 labeled pairs, and in 34% of the 2,250 pool pairs). In the unlabeled pool, tail words share responses with head
words of their own cluster; a confident pseudo-label (decided by the head words) then teaches
the tail words' quality, and the next round is confident on responses the last one was not.
That is the cluster assumption that self-training relies on, made explicit.
"""
import os

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from selfrm.files import write_jsonl

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
TEMPLATE_WORDS = ["[CONTEXT]", "[RESPONSE", "A]", "B]", "<turn>", "user", "assistant", "system", "A", "B",
                  "<|im_start|>", "<|im_end|>"]
N_TOPICS = 16
N_CLUSTERS = 8
WORDS_PER_CLUSTER = 24
# A chat template whose markers stand alone between spaces, so the word-level tokenizer keeps them.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} \n{{ m['content'] }} <|im_end|> \n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant \n{% endif %}")


def words():
    return ([f"t{i}" for i in range(N_TOPICS)] +
            [f"w{i}" for i in range(N_CLUSTERS * WORDS_PER_CLUSTER)])


def build_tokenizer(chat=False):
    """A fast word-level tokenizer over the template and task words (whitespace split)."""
    vocab = {w: i for i, w in enumerate(SPECIALS + TEMPLATE_WORDS + words())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(model_type, tokenizer, hidden_size=64, layers=2):
    """A tiny Llama (random init from torch's current seed) for the toy tokenizer."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, num_labels=1)
    return (LlamaForCausalLM if model_type == "pm" else LlamaForSequenceClassification)(config)


# ----------------------------------------------------------------------------- the task

def cluster_of_word(seed):
    """word index -> cluster, a seeded shuffle so clusters are not contiguous ids."""
    rng = np.random.default_rng([seed, 0])
    return rng.permutation(N_CLUSTERS * WORDS_PER_CLUSTER) // WORDS_PER_CLUSTER


def make_pairs(seed, n, response_length=6, zipf=1.2, stream=1):
    """n labeled pairs {prompt, chosen, rejected} of the task with this seed (see the module
    docstring). `stream` picks an independent sample from the same task."""
    rng = np.random.default_rng([seed, stream])
    clusters = cluster_of_word(seed)
    members = [np.flatnonzero(clusters == c) for c in range(N_CLUSTERS)]
    weights = 1.0 / np.arange(1, WORDS_PER_CLUSTER + 1) ** zipf
    weights /= weights.sum()
    rows = []
    for _ in range(n):
        c1, c2 = rng.choice(N_CLUSTERS, size=2, replace=False)
        good, bad = max(c1, c2), min(c1, c2)
        prompt = " ".join(f"t{t}" for t in rng.integers(0, N_TOPICS, size=3))
        chosen, rejected = (" ".join(f"w{w}" for w in rng.choice(members[c], size=response_length, p=weights))
                            for c in (good, bad))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def quality(response, seed):
    """The hidden rule: a response's quality is the cluster of its words (all share one)."""
    clusters = cluster_of_word(seed)
    found = {int(clusters[int(w[1:])]) for w in response.split()}
    assert len(found) == 1, "a toy response draws all its words from one cluster"
    return found.pop()


def as_unlabeled(rows, seed):
    """Pool rows {prompt, response_a, response_b, label}: the chosen side placed at random;
    `label` is gold, kept for reporting only."""
    rng = np.random.default_rng([seed, 99])
    out = []
    for row, swap in zip(rows, rng.random(len(rows)) < 0.5):
        a, b = (row["rejected"], row["chosen"]) if swap else (row["chosen"], row["rejected"])
        out.append({"prompt": row["prompt"], "response_a": a, "response_b": b, "label": "b" if swap else "a"})
    return out


# ----------------------------------------------------------------------------- the demo

DEMO_SIZES = {"labeled": 250, "pool": 2250, "eval": 1000}  # 10% of the training pairs carry labels


def demo_defaults(model_type="pm", filter="confidence"):
    """Settings of the built-in demo, where the command line does not set them: the papers'
    algorithms with hyper-parameters scaled to a tiny model on a CPU."""
    return {"model": "toy", "out_dir": f"runs/demo-{model_type}-{filter}", "max_length": 64, "epochs": 8,
            "lr": 2e-3, "warmup_steps": 10, "global_batch_size": 32, "micro_batch_size": 32, "log_every": 1000,
            "save_every": 0, "rounds": 3, "batch_size": 256, "status_min_count": 20}


def demo_files(folder):
    """The paths of the demo's files in `folder`."""
    return {name: os.path.join(folder, f"{name}.jsonl") for name in ("labeled", "pool", "full", "eval")}


def write_demo_data(folder, seed):
    """The demo's files: labeled.jsonl, pool.jsonl (gold kept as `label`, for reporting),
    full.jsonl (labeled + the pool with its gold labels: the fully supervised reference)
    and eval.jsonl. Files already there are kept (they follow from the seed, which the run's
    settings fix). Returns their paths."""
    paths = demo_files(folder)
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    n_train = DEMO_SIZES["labeled"] + DEMO_SIZES["pool"]
    train = make_pairs(seed, n_train, stream=1)
    rows = {"labeled": train[:DEMO_SIZES["labeled"]], "pool": as_unlabeled(train[DEMO_SIZES["labeled"]:], seed),
            "full": train, "eval": make_pairs(seed, DEMO_SIZES["eval"], stream=2)}
    for name, path in paths.items():
        if not os.path.exists(path):
            write_jsonl(path, rows[name])
    return paths
