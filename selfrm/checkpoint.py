"""Resumable checkpoints of a training run (run_dir/checkpoint/state.pt, and the shards of
an FSDP model beside it), and the step log that a resumed run rewrites to its checkpoint's
step. Each is written whole or not at all: a kill leaves the last complete one."""
import json
import os
import shutil

import torch

from selfrm import dist
from selfrm.files import TMP_SUFFIX, atomic_path, read_jsonl
from selfrm.fsdp import is_sharded, load_sharded, save_sharded
from selfrm.settings import SettingsError


def save_checkpoint(path, raw_model, optimizer, scaler, step, world, window):
    """Trainable weights, optimizer and scaler state, step, every rank's RNG state and open
    log window, written whole or not at all (plain tensors and numbers: loads with
    weights_only=True). A sharded (FSDP) model's weights and optimizer state are written by
    every rank as its own shards (torch.distributed.checkpoint), which state.pt names."""
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)
    per_rank = dist.gather_shards([(torch.get_rng_state(), cuda_rng, window["sums"].cpu())], world)
    state = {"scaler": scaler.state_dict(), "step": step, "rng": [r[0] for r in per_rank],
             "cuda_rng": [r[1] for r in per_rank], "window_sums": [r[2] for r in per_rank],
             "window_pairs": window["pairs"], "window_tokens": window["tokens"]}
    if is_sharded(raw_model):
        # every rank writes its shards into a hidden folder; rank 0 renames it into place, then
        # state.pt (one rename) points at it, then the older one goes: one is complete at every moment
        name = f"shards-{step:08d}"
        hidden, target = os.path.join(path, f".{name}{TMP_SUFFIX}"), os.path.join(path, name)
        save_sharded(hidden, raw_model, optimizer)
        dist.barrier()
        if world.master:
            if os.path.exists(target):  # left by a kill between this rename and state.pt's: state.pt never named it
                shutil.rmtree(target)
            os.replace(hidden, target)
            state["shards"] = name
    elif world.master:
        state["model"] = {n: p.detach().cpu() for n, p in raw_model.named_parameters() if p.requires_grad}
        state["optimizer"] = optimizer.state_dict()
    if world.master:
        with atomic_path(os.path.join(path, "state.pt")) as tmp:  # one file, replaced in one rename
            torch.save(state, tmp)
        for old in os.listdir(path):
            if old.startswith("shards-") and old != state.get("shards"):
                shutil.rmtree(os.path.join(path, old))


def load_checkpoint(path, raw_model, optimizer, scaler, world):
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    if len(state["rng"]) != world.world_size:  # each rank's data shard and RNG state belong to its count
        raise SettingsError(f"{path}: this run was checkpointed by {len(state['rng'])} ranks and is resumed by "
                            f"{world.world_size}: resume it with --nproc_per_node={len(state['rng'])}, or start over "
                            f"with --resume=false --overwrite=true")
    if is_sharded(raw_model):
        load_sharded(os.path.join(path, state["shards"]), raw_model, optimizer)
    else:
        missing = raw_model.load_state_dict(state["model"], strict=False).unexpected_keys
        if missing:
            raise ValueError(f"{path}: checkpoint weights {missing[:3]} do not belong to this model")
        optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"][world.rank])
    if torch.cuda.is_available() and state["cuda_rng"][world.rank].numel():
        torch.cuda.set_rng_state(state["cuda_rng"][world.rank])
    window = {"sums": state["window_sums"][world.rank].to(world.device), "pairs": state["window_pairs"],
              "tokens": state["window_tokens"]}
    return state["step"], window


def read_log(path, step):
    """Log rows up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not os.path.exists(path):
        return []
    rows = [r for r in read_jsonl(path) if r["step"] <= step]
    if dist.is_master():
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows
