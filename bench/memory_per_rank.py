"""Per-rank memory of a full pm optimizer step with gradient accumulation (4 micro-steps per
rank, micro-batch 1) and bf16 autocast, through selfrm's trainer (set_up, backward_global_batch,
optimizer_step): DDP against FSDP (--fsdp=true) at 1 and 2 ranks (gloo on the CPU), every
weight trained and LoRA (fp32 base, --weights_dtype=bf16 base, FSDP); and FSDP as it
accumulated before issue 27 (`fsdp-old`: gradient sync off on the non-last micro-steps, so
each rank held the whole unsharded fp32 gradient until the last one) against FSDP now (a
reduce-scatter at every micro-step into each rank's shard). Then the arithmetic for Llama3-8B
on 8 GPUs next to an H100's 80 GB.

    python bench/memory_per_rank.py          # launches torchrun itself

Two figures per rank:
- held: the bytes of the tensors of parameters, gradients (after the step's last backward)
  and AdamW state (a DTensor's local shard), counted, not measured;
- peak: the peak RSS of one whole optimizer step (its micro-steps and the AdamW update) above
  the RSS at its start (VmHWM, reset through /proc/self/clear_refs), with 1 and with 4
  micro-steps. It holds the gradients, the activations and FSDP's gathered weights; the
  weights and AdamW state, there before the step, are not in it. MALLOC_MMAP_THRESHOLD_ is
  fixed so that a freed tensor leaves the RSS at once.
"""
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("ddp", "fsdp", "fsdp-old", "ddp-lora", "ddp-lora-bf16", "fsdp-lora")
TOKENS, MICRO_STEPS = 128, 4


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_bytes(tensors):
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def peak_rss():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def old_gradient_sync(model, last):
    """FSDP before issue 27 (the FSDP-wrapped model only): no reduce-scatter before the last micro-step."""
    model.set_requires_gradient_sync(last)
    return nullcontext()


def worker(mode):
    from transformers import LlamaConfig, LlamaForCausalLM
    from selfrm import dist, trainer
    from selfrm.modeling import PreferenceModel, add_lora, store_frozen
    from selfrm.settings import TrainSettings, make
    world = dist.compute_init()
    torch.manual_seed(0)
    # the blocks hold 86% of the weights, as in Llama3-8B (whose embeddings and head are 13%): under FSDP
    # the root unit (embeddings, head) is gathered for the whole step, and a larger share would hide the blocks
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = PreferenceModel(LlamaForCausalLM(config))
    n_params = sum(p.numel() for p in model.parameters())
    lora = "lora" in mode
    cfg = make(TrainSettings, fsdp=mode.startswith("fsdp"), dtype="bf16", micro_batch_size=1, lr=1e-4, lora=lora,
               lora_dropout=0.0, weights_dtype="bf16" if mode.endswith("bf16") else "fp32")
    if lora:  # peft's default targets for Llama (q_proj, v_proj), r=8
        add_lora(model, cfg)
    if cfg.weights_dtype == "bf16":
        store_frozen(model, torch.bfloat16)
    if mode == "fsdp-old":
        trainer.gradient_sync = old_gradient_sync
    s = trainer.set_up(cfg, model, type("Tokenizer", (), {"pad_token_id": 0})(), world, {"A": 12, "B": 13})
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(14, config.vocab_size, (TOKENS,), generator=g).tolist(), "label": 12}
                for _ in range(MICRO_STEPS * world.world_size)]
    peaks, held = {}, {}
    for step, k in enumerate((1, 1, MICRO_STEPS)):  # the first step allocates AdamW's state
        batch = examples[:k * world.world_size]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS starts again from the RSS now
        start = peak_rss()
        trainer.backward_global_batch(s, [[e] for e in batch[world.rank::world.world_size]], len(batch))
        params = list(s.raw_model.parameters())
        held = {"param_bytes": local_bytes(params), "grad_bytes": local_bytes([p.grad for p in params if p.grad is not None])}
        trainer.optimizer_step(s, cfg, step, 10)
        peaks[k] = peak_rss() - start
    held["optimizer_bytes"] = local_bytes([v for st in s.optimizer.state.values() for v in st.values()
                                           if torch.is_tensor(v) and v.numel() > 1])
    row = {"mode": mode, "ranks": world.world_size, "rank": world.rank, "params": n_params, **held,
           "peak_1": peaks[1], f"peak_{MICRO_STEPS}": peaks[MICRO_STEPS]}
    rows = dist.gather_shards([row], world)
    if world.master:
        print(json.dumps(rows), flush=True)
    dist.compute_cleanup()
    dist.leave(0)  # not the interpreter's teardown, where gloo's threads can hang or abort


def launch(mode, ranks):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    # a free port for each launch: a fixed one collides with any process still holding it
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
           __file__, f"--worker={mode}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    results = [r for mode in MODES for ranks in (1, 2) if not (mode == "fsdp-old" and ranks == 1)
               for r in launch(mode, ranks)]
    mb = lambda b: b / 2**20
    print(f"{'mode':13s} {'ranks':>5s} {'rank':>4s} {'params MB':>10s} {'grads MB':>9s} {'AdamW MB':>9s} "
          f"{'held MB':>8s} {'peak 1 MB':>10s} {f'peak {MICRO_STEPS} MB':>10s}")
    by = {}
    for r in results:
        r["held"] = r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        by[(r["mode"], r["ranks"], r["rank"])] = r
        print(f"{r['mode']:13s} {r['ranks']:5d} {r['rank']:4d} {mb(r['param_bytes']):10.1f} {mb(r['grad_bytes']):9.1f} "
              f"{mb(r['optimizer_bytes']):9.1f} {mb(r['held']):8.1f} {mb(r['peak_1']):10.1f} "
              f"{mb(r[f'peak_{MICRO_STEPS}']):10.1f}")
    n = results[0]["params"]
    print(f"({n / 1e6:.1f}M-parameter Llama, fp32 weights, bf16 autocast, {TOKENS} tokens, micro-batch 1; grads "
          f"after the step's last backward; peak: one optimizer step above its start, with 1 and {MICRO_STEPS} "
          f"micro-steps per rank; lora: the base frozen, r=8 on q_proj and v_proj)")
    for rank in (0, 1):
        held = lambda mode: by[(mode, 2, rank)]["held"]
        print(f"held, FSDP / DDP per rank at 2 ranks (rank {rank}): every weight trained "
              f"{held('fsdp') / held('ddp'):.3f}, LoRA {held('fsdp-lora') / held('ddp-lora'):.3f}")
    for rank in (0, 1):
        now, old = by[("fsdp", 2, rank)], by[("fsdp-old", 2, rank)]
        grow = lambda r: mb(r[f"peak_{MICRO_STEPS}"] - r["peak_1"])
        print(f"FSDP step peak at 2 ranks, {MICRO_STEPS} micro-steps (rank {rank}): before issue 27 "
              f"{mb(old[f'peak_{MICRO_STEPS}']):.1f} MB, now {mb(now[f'peak_{MICRO_STEPS}']):.1f} MB: old / now "
              f"{old[f'peak_{MICRO_STEPS}'] / now[f'peak_{MICRO_STEPS}']:.2f}x; from 1 to {MICRO_STEPS} micro-steps "
              f"the peak grows {grow(old):+.1f} MB before, {grow(now):+.1f} MB now (the whole fp32 gradient is "
              f"{mb(4 * n):.1f} MB, one rank's shard {mb(now['grad_bytes']):.1f} MB)")
    print(f"held, LoRA, --weights_dtype=bf16 / fp32 per rank (DDP, 1 rank): "
          f"{by[('ddp-lora-bf16', 1, 0)]['held'] / by[('ddp-lora', 1, 0)]['held']:.3f}")
    arithmetic()


def arithmetic():
    """The same counting at the papers' scale: fp32 weights and gradients, AdamW's two moments;
    the accumulation buffer FSDP held before issue 27 is the whole fp32 gradient, whatever the
    number of ranks."""
    n = 8.03e9  # Llama3-8B
    full, grad = n * (4 + 4 + 8) / 1e9, n * 4 / 1e9
    print(f"Llama3-8B full fine-tuning, fp32 weights + grads + AdamW, with gradient accumulation: DDP {full:.1f} GB "
          f"per GPU; FSDP {full / 8:.1f} GB per GPU on 8 GPUs, {full / 16:.1f} GB on 16 (+ activations and one "
          f"block's gathered weights and gradient); before issue 27 FSDP added the whole fp32 gradient, {grad:.1f} "
          f"GB per GPU, while gradients accumulated ({full / 8 + grad:.1f} GB on 8 GPUs, {full / 16 + grad:.1f} GB "
          f"on 16); an H100 has 80 GB")
    print(f"Llama3-8B LoRA, the frozen base per GPU: DDP fp32 {n * 4 / 1e9:.1f} GB, DDP --weights_dtype=bf16 "
          f"{n * 2 / 1e9:.1f} GB, FSDP fp32 on 8 GPUs {n * 4 / 8 / 1e9:.1f} GB (the adapters add ~0.1 GB with AdamW)")


if __name__ == "__main__":
    if any(a.startswith("--worker=") for a in sys.argv[1:]):
        worker(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--worker=")))
    else:
        main()
