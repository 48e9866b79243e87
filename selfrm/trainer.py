"""The training loop and its collators: AdamW, warm-up + decay, gradient accumulation,
clipping, autocast (+ GradScaler for fp16), DDP or FSDP2, logging, the final save (resumable
checkpoints: checkpoint.py).

Every rank computes the same plan of global batches from (seed, epoch), takes its strided
share of each, and splits that into micro-batches. Each micro-batch's loss is
sum(per-pair losses) * world_size / (pairs in the global batch): after DDP averages the
gradients over ranks, the step sees exactly the mean over the global batch, whatever the
number of ranks, micro-batches, or the size of the last batch.
"""
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from selfrm import dist, settings
from selfrm.checkpoint import load_checkpoint, read_log, save_checkpoint
from selfrm.fsdp import full_model_state, is_sharded, shard_from_rank0
from selfrm.losses import pairwise_loss, srm_loss
from selfrm.modeling import rebuilt, save_model
from selfrm.sharing import last_non_pad, pack_pairs, pad_right, resolve_share_prefix


# ----------------------------------------------------------------------------- plan and schedule

def global_batches(lengths, cfg, world, epoch):
    """The global batches of one epoch (lists of example indices), the same on every rank. A
    last batch with fewer pairs than ranks is dropped: every rank needs one to step."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(lengths))
    batches = [order[i:i + cfg.global_batch_size] for i in range(0, len(order), cfg.global_batch_size)]
    batches = [b for b in batches if len(b) >= world.world_size]
    if cfg.group_by_length:  # similar lengths side by side: less padding, same sum over the batch
        batches = [b[np.argsort([lengths[i] for i in b], kind="stable")] for b in batches]
    return batches


def micro_batches(global_batch, cfg, world):
    """This rank's micro-batches of one global batch."""
    mine = global_batch[world.rank::world.world_size]
    return [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]


def most_micro_batches(global_batch, cfg, world):
    """The most micro-batches any rank gets of this global batch: rank 0's, the strided
    split giving it the largest share."""
    return math.ceil(math.ceil(len(global_batch) / world.world_size) / cfg.micro_batch_size)


def lr_at(step, total_steps, cfg):
    """Linear warm-up to cfg.lr, then cosine or linear decay to 0 (or constant)."""
    warmup = min(cfg.warmup_steps, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr


def warn_few_steps(cfg, pairs, total_steps, desc):
    """A run of fewer optimizer steps than its warm-up, or than 10, barely trains: say so."""
    if total_steps >= max(cfg.warmup_steps, 10) or total_steps == cfg.max_steps:  # --max_steps: asked for
        return
    why = [f"fewer than --warmup_steps={cfg.warmup_steps}, so the warm-up is cut to {total_steps}"
           if total_steps < cfg.warmup_steps else "", "fewer than 10" if total_steps < 10 else ""]
    dist.print0(f"warning: {desc}: {pairs} pairs at --global_batch_size={cfg.global_batch_size} and "
                f"--epochs={cfg.epochs} make {total_steps} optimizer step{'s' if total_steps != 1 else ''} "
                f"({'; '.join(w for w in why if w)}): lower --global_batch_size or raise --epochs")


def autocast_dtype(cfg, device):
    """The autocast dtype, or None for fp32. 'auto' is bf16 on a GPU that has it natively: by default
    is_bf16_supported counts emulation, which is slow (V100, T4: no bf16 hardware)."""
    name = cfg.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def make_optimizer(params, cfg, device):
    """AdamW with decoupled weight decay on matrices only: biases, norm weights and every other
    1-D parameter are exempt (the convention of transformers' Trainer and TRL)."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=device.type == "cuda")


# ----------------------------------------------------------------------------- one micro-batch

def pair_losses(model, batch, margin=0.0, center=0.0):
    """Per-pair losses (B,) and correctness (B,) of one collated batch, for either kind."""
    if "labels" in batch:  # pm: the label is A or B, the "other" token is the wrong answer
        label_logits = model(batch["input_ids"], batch["attention_mask"], batch["label_positions"])
        labels = batch["labels"]
        other = batch["other_labels"]
        correct = label_logits.gather(1, labels[:, None]) > label_logits.gather(1, other[:, None])
        return srm_loss(label_logits, labels, other, batch.get("probs")), correct.squeeze(1)
    chosen_rewards, rejected_rewards = pair_rewards(model, batch)
    losses = pairwise_loss(chosen_rewards, rejected_rewards, batch["margins"] + margin, center, batch.get("probs"))
    return losses, chosen_rewards > rejected_rewards


def pair_rewards(model, batch):
    """(chosen rewards, rejected rewards), (B,) each, of a collated rm batch in either layout:
    the 2B sequences stacked (chosen first), or one row per pair with its prefix shared."""
    if "segment_ids" in batch:
        rewards = model(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["position_ids"],
                        read_positions=batch["read_positions"])
        return rewards[:, 0], rewards[:, 1]
    return model(batch["input_ids"], batch["attention_mask"]).chunk(2)


def backward_global_batch(s, micro, n_global, micro_steps=0):
    """Forward and backward this rank's micro-batches (lists of examples) of one global batch
    of n_global pairs; gradients end up as the mean over the global batch. Returns this
    rank's (loss sum, correct count) as a device tensor: no host sync here. s: the Setup.

    micro_steps: run at least this many forward/backward passes. Under FSDP each one gathers
    weights from every rank, so a rank with fewer micro-batches than another (9 pairs on 2
    ranks) repeats its first one with weight 0: it takes part and adds nothing."""
    device, world_size = s.world.device, s.world.world_size
    weights = [1.0] * len(micro) + [0.0] * max(0, micro_steps - len(micro))
    stats = torch.zeros(2, device=device)
    for k, weight in enumerate(weights):
        examples = micro[k] if weight else micro[0]
        batch = {key: v.to(device, non_blocking=True) for key, v in s.collate(examples).items()}
        # a padding step draws its dropout masks from a copy of the RNG: later steps see what they would under DDP
        rng = nullcontext() if weight else torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with gradient_sync(s.model, last=k == len(weights) - 1), rng:
            with s.autocast:
                losses, correct = pair_losses(s.model, batch, s.margin, s.center)
            s.scaler.scale(losses.sum() * (weight * world_size / n_global)).backward()
        if weight:
            stats += torch.stack([losses.detach().sum(), correct.sum().float()])
    return stats


def gradient_sync(model, last):
    """DDP reduces gradients over ranks only on the last micro-step of a step (no_sync before
    it): its ranks hold whole gradients anyway. FSDP reduce-scatters at every micro-step and
    accumulates into each rank's shard: without sync it would hold the whole unsharded
    gradient, in fp32, on every rank until the last one (a Llama3-8B's: 32 GB per GPU)."""
    return model.no_sync() if isinstance(model, DDP) and not last else nullcontext()


# ----------------------------------------------------------------------------- collators

def collate_pm(examples, pad_id):
    """-> input_ids, attention_mask (B, T); label_positions, labels (B,): the label token's
    id, predicted from the hidden state at label_positions (the last real token)."""
    input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "label_positions": attention_mask.sum(1) - 1,
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


def collate_rm(examples, pad_id, share_prefix=False):
    """-> input_ids, attention_mask (2B, T): the B chosen sequences, then the B rejected
    ones, so one forward scores both; margins (B,). With share_prefix, one row per pair in
    the shared-prefix layout of selfrm/sharing.py (chosen = sequence 1): input_ids,
    position_ids, segment_ids (B, T) and read_positions (B, 2) in place of the first two."""
    if share_prefix:
        batch = pack_pairs([(e["chosen_ids"], e["rejected_ids"]) for e in examples], pad_id, last_non_pad)
    else:
        seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        input_ids, attention_mask = pad_right(seqs, pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch["margins"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


def example_length(example):
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def make_collate(model_type, tokenizer, label_ids, share_prefix=False, soft_labels=False):
    """The collator of a model kind. share_prefix: rm pairs in the shared-prefix layout (a pm
    trains one order per pair: nothing to share); soft_labels adds `probs` (B,), each pair's
    probability that its chosen response is better, which the losses then train towards."""
    pad_id = tokenizer.pad_token_id

    def collate(examples):
        if model_type == "rm":
            batch = collate_rm(examples, pad_id, share_prefix)
        else:
            batch = collate_pm(examples, pad_id)
            batch["other_labels"] = torch.where(batch["labels"] == label_ids["A"], label_ids["B"], label_ids["A"])
        if soft_labels:
            batch["probs"] = torch.tensor([e["prob"] for e in examples], dtype=torch.float32)
        return batch
    return collate


# ----------------------------------------------------------------------------- the loop

@dataclass
class Setup:
    """What every optimizer step uses, made once (set_up): the model as it trains (DDP- or
    FSDP-wrapped; raw_model is the unwrapped one, which is checkpointed and saved)."""
    model: torch.nn.Module
    raw_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list  # the trainable parameters, in the model's order (clipping's norm sums them in it)
    autocast: object  # torch.autocast, or nullcontext for fp32
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    collate: object  # examples -> a batch of tensors (make_collate)
    world: dist.Dist
    margin: float = 0.0  # rm: the loss's margin m, on top of each pair's own
    center: float = 0.0  # rm: --center_rewards_coefficient


def set_up(cfg, model, tokenizer, world, label_ids):
    """Wrap the model (FSDP2 or DDP) and make its optimizer, AMP context and collator."""
    device, fsdp = world.device, cfg.fsdp and world.ddp
    raw_model = model if fsdp else model.to(device)
    # training mode: dropout (the model's, LoRA's) is on, and the library only checkpoints in it
    raw_model.train()
    if cfg.gradient_checkpointing:
        raw_model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    amp_dtype = autocast_dtype(cfg, device)
    if fsdp:  # in place: raw_model is the sharded model too
        model = shard_from_rank0(raw_model, device, world, amp_dtype)
    elif world.ddp:
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = raw_model
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # resolved for a pm too (it trains one order per pair, unshared): --share_prefix=true on a model that
    # cannot take the layout is refused here, before round 0 trains, not when the pool is first scored
    share_prefix = resolve_share_prefix(cfg.share_prefix, raw_model.hf.config) and cfg.model_type == "rm"
    collate = make_collate(cfg.model_type, tokenizer, label_ids, share_prefix, cfg.soft_labels)
    return Setup(model, raw_model, optimizer, params, autocast, scaler, collate, world, cfg.margin,
                 cfg.center_rewards_coefficient)


def total_steps_of(cfg, lengths, world, desc):
    """(optimizer steps per epoch, in the run): epochs of global batches, at most --max_steps."""
    steps_per_epoch = len(global_batches(lengths, cfg, world, 0))
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    if total == 0:
        raise ValueError(f"{desc}: {len(lengths)} pairs make no global batch of {world.world_size}+ pairs")
    warn_few_steps(cfg, len(lengths), total, desc)
    return steps_per_epoch, total


def optimizer_step(s, cfg, step, total_steps):
    """The learning rate of this step, then clip (after unscaling fp16's gradients), step, zero."""
    lr = lr_at(step, total_steps, cfg)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    if cfg.grad_clip > 0:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.params, cfg.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    return lr


def new_window(device):
    """This rank's loss sum and correct count, and the global batches' pairs and tokens, since the last log."""
    return {"sums": torch.zeros(2, device=device), "pairs": 0, "tokens": 0}


def train(cfg, model, tokenizer, examples, run_dir, world, label_ids=None, desc="train", counts=None):
    """Train `model` (a PreferenceModel or RewardModel) on encoded `examples`; save the final
    model to run_dir/model and return a summary (`counts`, the encoder's truncated/dropped,
    join it), which is also saved in the model folder. Resumes from run_dir/checkpoint."""
    s = set_up(cfg, model, tokenizer, world, label_ids)
    lengths = [example_length(e) for e in examples]
    tokens_of = [len(e["input_ids"]) if "input_ids" in e else len(e["chosen_ids"]) + len(e["rejected_ids"])
                 for e in examples]
    steps_per_epoch, total_steps = total_steps_of(cfg, lengths, world, desc)
    ckpt_dir, log_path = os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "train_log.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    step, window = 0, new_window(world.device)
    if os.path.exists(os.path.join(ckpt_dir, "state.pt")):
        step, window = load_checkpoint(ckpt_dir, s.raw_model, s.optimizer, s.scaler, world)
        dist.print0(f"{desc}: resumed from {ckpt_dir} at step {step}/{total_steps}")
    log_rows = read_log(log_path, step)
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not world.master, dynamic_ncols=True, leave=False)
    t_window, batches, batches_epoch = time.time(), None, -1
    while step < total_steps:  # (a preemption's exception closes the bar on its way out)
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = global_batches(lengths, cfg, world, epoch), epoch
        global_batch = batches[index]
        micro = [[examples[i] for i in idx] for idx in micro_batches(global_batch, cfg, world)]
        # under FSDP every rank runs as many micro-steps as rank 0 (each one gathers weights)
        fsdp_steps = most_micro_batches(global_batch, cfg, world) if is_sharded(s.model) else 0
        window["sums"] += backward_global_batch(s, micro, len(global_batch), fsdp_steps)
        lr = optimizer_step(s, cfg, step, total_steps)
        step += 1
        window["pairs"] += len(global_batch)
        window["tokens"] += sum(tokens_of[i] for i in global_batch)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:  # the only host sync of the loop
            log_rows.append(log_step(window, time.time() - t_window, step, epoch, lr, world, log_path))
            if world.master:
                row = log_rows[-1]
                bar.write(f"{desc} step {step:5d}/{total_steps} | loss {row['loss']:.4f} | acc {row['accuracy']:.3f} "
                          f"| lr {lr:.2e} | {row['pairs_per_s']:.1f} pairs/s | {row['tokens_per_s']:.0f} tok/s")
            window, t_window = new_window(world.device), time.time()
        checkpoint_or_stop(cfg, s, step, total_steps, window, ckpt_dir, desc, bar)
    bar.close()
    last = log_rows[-1] if log_rows else {}
    summary = {"steps": total_steps, "pairs": len(examples), "train_loss": last.get("loss"),
               "train_accuracy": last.get("accuracy"), **(counts or {})}
    save_final(cfg, s, tokenizer, run_dir, summary)
    return summary


def log_step(window, elapsed, step, epoch, lr, world, log_path):
    """The step's log row, summed over ranks (a host sync), appended to train_log.jsonl."""
    loss_sum, correct_sum = dist.all_reduce_sum(window["sums"].clone()).tolist()
    pairs = window["pairs"]
    row = {"step": step, "epoch": epoch, "loss": loss_sum / pairs, "accuracy": correct_sum / pairs,
           "lr": lr, "pairs_per_s": pairs / elapsed, "tokens_per_s": window["tokens"] / elapsed}
    if world.master:
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def checkpoint_or_stop(cfg, s, step, total_steps, window, ckpt_dir, desc, bar):
    """Checkpoint every --save_every steps; on a preemption signal, checkpoint and stop."""
    preempted = dist.preemption_signal(s.world) if step < total_steps else None
    if preempted or (cfg.save_every > 0 and step % cfg.save_every == 0 and step < total_steps):
        save_checkpoint(ckpt_dir, s.raw_model, s.optimizer, s.scaler, step, s.world, window)
    if preempted:
        dist.barrier()  # rank 0's state.pt is written before any rank exits (torchrun would kill it)
        bar.close()
        raise dist.Preempted(f"{desc}: stopped by {signal.Signals(preempted).name} after step {step}/{total_steps}; "
                             f"checkpoint written to {ckpt_dir}: rerun the same command to resume", preempted)


def save_final(cfg, s, tokenizer, run_dir, summary):
    """The trained model to run_dir/model (rank 0; FSDP's shards gathered first); the
    checkpoint goes."""
    to_save, world = s.raw_model, s.world
    if is_sharded(s.raw_model):
        full = full_model_state(s.raw_model)  # a collective: every rank takes part, rank 0 receives
        to_save = rebuilt(s.raw_model, full) if world.master else None
    elif world.master and cfg.weights_dtype != "fp32" and not cfg.save_adapter_only:  # merge in fp32
        to_save = rebuilt(s.raw_model, {k: v.detach().to("cpu", torch.float32) for k, v in s.raw_model.state_dict().items()})
    if world.master:
        save_model(to_save, tokenizer, os.path.join(run_dir, "model"), settings.to_dict(cfg), cfg.save_adapter_only, summary)
        shutil.rmtree(os.path.join(run_dir, "checkpoint"), ignore_errors=True)
    dist.barrier()
