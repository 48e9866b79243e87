"""Bytes each rank holds for parameters, gradients and AdamW state after one pm training step:
DDP against FSDP (--fsdp=true), 1 and 2 ranks (gloo on the CPU), every weight trained and
LoRA (fp32 base, --weights_dtype=bf16 base, FSDP), through selfrm's own pieces; then the same
arithmetic for Llama3-8B on 8 GPUs next to an H100's 80 GB.

    python bench/memory_per_rank.py          # launches torchrun itself

Counted from the tensors each rank holds (a DTensor's local shard), not from the allocator:
activations and the per-block gathered weights of FSDP come on top.
"""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_bytes(tensors):
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def worker(mode):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaConfig, LlamaForCausalLM
    from selfrm import dist
    from selfrm.fsdp import shard
    from selfrm.losses import srm_loss
    from selfrm.modeling import PreferenceModel, add_lora, store_frozen
    from selfrm.settings import TrainSettings, make
    from selfrm.trainer import make_optimizer
    world = dist.compute_init()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = PreferenceModel(LlamaForCausalLM(config)).train()
    n_params = sum(p.numel() for p in model.parameters())
    if "lora" in mode:  # peft's default targets for Llama (q_proj, v_proj), r=8
        add_lora(model, make(TrainSettings, lora=True, lora_dropout=0.0))
    if mode.endswith("bf16"):
        store_frozen(model, torch.bfloat16)
    fsdp = mode.startswith("fsdp") and world.ddp
    wrapped = shard(model) if fsdp else DDP(model) if world.ddp else model
    params = [p for p in model.parameters()]
    optimizer = make_optimizer([p for p in params if p.requires_grad], make(TrainSettings, lr=1e-4), world.device)
    ids = torch.randint(0, 32000, (2, 256))
    mask = torch.ones_like(ids)
    srm_loss(wrapped(ids, mask, mask.sum(1) - 1), torch.tensor([12, 13])).sum().backward()
    optimizer.step()
    row = {"mode": mode, "ranks": world.world_size, "rank": world.rank, "params": n_params,
           "param_bytes": local_bytes(params), "grad_bytes": local_bytes([p.grad for p in params if p.grad is not None]),
           "optimizer_bytes": local_bytes([v for s in optimizer.state.values() for v in s.values()
                                           if torch.is_tensor(v) and v.numel() > 1])}
    rows = dist.gather_shards([row], world)
    if world.master:
        print(json.dumps(rows), flush=True)
    dist.compute_cleanup()
    dist.leave(0)  # not the interpreter's teardown, where gloo's threads can hang or abort


def main():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for mode in ("ddp", "fsdp", "ddp-lora", "ddp-lora-bf16", "fsdp-lora"):
        for ranks in (1, 2):
            # a free port for each launch: a fixed one collides with any process still holding it
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                   f"--master_port={free_port()}", __file__, f"--worker={mode}"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=900).stdout
            results += json.loads(out.strip().splitlines()[-1])
    mb = lambda b: b / 2**20
    print(f"{'mode':13s} {'ranks':>5s} {'rank':>4s} {'params MB':>10s} {'grads MB':>9s} {'AdamW MB':>9s} {'total MB':>9s}")
    totals = {}
    for r in results:
        total = r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        totals[(r["mode"], r["ranks"], r["rank"])] = total
        print(f"{r['mode']:13s} {r['ranks']:5d} {r['rank']:4d} {mb(r['param_bytes']):10.1f} {mb(r['grad_bytes']):9.1f} "
              f"{mb(r['optimizer_bytes']):9.1f} {mb(total):9.1f}")
    print(f"({results[0]['params'] / 1e6:.1f}M-parameter Llama, fp32 unless the mode says bf16; "
          f"lora: the base frozen, r=8 on q_proj and v_proj)")
    for rank in (0, 1):
        print(f"FSDP / DDP per rank at 2 ranks (rank {rank}): every weight trained "
              f"{totals[('fsdp', 2, rank)] / totals[('ddp', 2, rank)]:.3f}, "
              f"LoRA {totals[('fsdp-lora', 2, rank)] / totals[('ddp-lora', 2, rank)]:.3f}")
    print(f"LoRA, --weights_dtype=bf16 / fp32 per rank (DDP, 1 rank): "
          f"{totals[('ddp-lora-bf16', 1, 0)] / totals[('ddp-lora', 1, 0)]:.3f}")
    # the same arithmetic at the papers' scale: fp32 weights and gradients, AdamW's two moments
    n = 8.03e9  # Llama3-8B
    full = n * (4 + 4 + 8) / 1e9
    print(f"Llama3-8B full fine-tuning, fp32 weights + grads + AdamW: DDP {full:.1f} GB per GPU; "
          f"FSDP on 8 GPUs {full / 8:.1f} GB per GPU (+ activations and one block's gathered weights); "
          f"an H100 has 80 GB")
    print(f"Llama3-8B LoRA, the frozen base per GPU: DDP fp32 {n * 4 / 1e9:.1f} GB, DDP --weights_dtype=bf16 "
          f"{n * 2 / 1e9:.1f} GB, FSDP fp32 on 8 GPUs {n * 4 / 8 / 1e9:.1f} GB (the adapters add ~0.1 GB with AdamW)")


if __name__ == "__main__":
    if any(a.startswith("--worker=") for a in sys.argv[1:]):
        worker(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--worker=")))
    else:
        main()
