"""Peak memory of one pairwise-model training step (forward + backward), two comparisons:

1. the label-position head against full logits, on a Gemma-like config (256k vocabulary,
   tied embeddings) at 2k tokens;
2. --gradient_checkpointing on against off, on an 8-layer Llama (hidden 512) at 2k tokens,
   through selfrm's own path (training mode, the trainer's checkpointing call).

    python bench/memory.py [--tokens=2048]

Each variant runs in its own process with MALLOC_MMAP_THRESHOLD_ fixed (glibc otherwise
moves its threshold as it frees, and the peak of equal runs differs by ~0.6 GB); a thread
samples the resident set size every millisecond during the step, and the figure is the
peak minus the RSS just before the step.
"""
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def step_peak(variant, tokens):
    from transformers import LlamaConfig, LlamaForCausalLM
    from selfrm.losses import srm_loss
    from selfrm.modeling import PreferenceModel
    torch.manual_seed(0)
    if variant.startswith("checkpointing"):
        config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    else:
        config = LlamaConfig(vocab_size=256000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                             max_position_embeddings=4096)
    hf = LlamaForCausalLM(config)
    model = PreferenceModel(hf).train()
    if variant == "checkpointing_on":  # what trainer.train does for --gradient_checkpointing=true
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    mask, position, label = torch.ones_like(ids), torch.tensor([tokens - 1]), torch.tensor([10])
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)
    thread = threading.Thread(target=sample)
    thread.start()
    if variant != "full_logits":
        loss = srm_loss(model(ids, mask, position), label).sum()
    else:  # what a plain `model(...).logits` does: (1, T, V) logits, then the label position
        logits = hf(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[0, position].float(), label)
    loss.backward()
    done.set()
    thread.join()
    return peak[0] - before


def main():
    tokens = 2048
    for a in sys.argv[1:]:
        if a.startswith("--tokens="):
            tokens = int(a.split("=", 1)[1])
        elif a.startswith("--variant="):
            print(step_peak(a.split("=", 1)[1], tokens))
            return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    peaks = {}
    for variant in ("selfrm", "full_logits", "checkpointing_off", "checkpointing_on"):
        out = subprocess.run([sys.executable, __file__, f"--variant={variant}", f"--tokens={tokens}"],
                             capture_output=True, text=True, check=True, env=env).stdout
        peaks[variant] = float(out.strip().splitlines()[-1])
        print(f"{variant:18s} step peak {peaks[variant]:8.0f} MB above the model", flush=True)
    print(f"selfrm / full logits: {peaks['selfrm'] / peaks['full_logits']:.3f}x (target <= 0.5); "
          f"256k vocabulary, {tokens} tokens, fp32")
    print(f"checkpointing on / off: {peaks['checkpointing_on'] / peaks['checkpointing_off']:.3f}x; "
          f"8-layer Llama, hidden 512, {tokens} tokens, fp32, training mode")


if __name__ == "__main__":
    main()
