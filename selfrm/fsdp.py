"""FSDP2 (`torch.distributed.fsdp.fully_shard`): weights, gradients and optimizer state
sharded over the ranks, for models whose full fine-tuning does not fit one GPU under DDP.

Each decoder block is one unit (gathered for its forward and backward, then freed); the
PreferenceModel/RewardModel wrapper is the root, so the embeddings, the final norm and the
head are whole inside its forward (the label-row head runs inside it). Mixed precision follows
--dtype: bf16 gathers the weights in bf16 for compute and reduces gradients in fp32 (master
weights and AdamW state stay fp32); fp32 is no mixed precision. fp16 is refused in settings:
its loss scaler would need every rank to agree on an overflow found in any shard.
"""
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from selfrm.settings import SettingsError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on the CPU
TRAINABLE = StateDictOptions(ignore_frozen_params=True)  # checkpoints: the frozen base (LoRA) is reloaded, not saved


def mixed_precision(compute_dtype):
    """The policy for a compute dtype (None: fp32, no mixed precision)."""
    if compute_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def shard(model, compute_dtype=None):
    """Shard `model` (a PreferenceModel or RewardModel) in place: every decoder block, then
    the wrapper as the root. Returns it."""
    policy = mixed_precision(compute_dtype)
    for block in decoder_blocks(model.hf):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def shard_from_rank0(model, device, world, compute_dtype=None):
    """Shard a model that only rank 0 has loaded (the others built it on the meta device, so a
    node's host memory holds one copy, not one per rank), then fill every rank's shards from
    rank 0's full state. Buffers come from rank 0 too: non-persistent ones (Llama's rotary
    inv_freq) are computed at construction, not loaded, and hold garbage after to_empty."""
    if world.master:
        model.to(device)
    full = model.state_dict() if world.master else {}  # references to rank 0's tensors, no copy
    shard(model, compute_dtype)
    if not world.master:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)
    return model


def decoder_blocks(hf):
    backbone = getattr(hf, hf.base_model_prefix)
    for name in ("layers", "h", "blocks", "layer"):
        blocks = getattr(backbone, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return list(blocks)
        encoder = getattr(backbone, "encoder", None)  # BERT-like encoders keep them one level down
        if encoder is not None and isinstance(getattr(encoder, name, None), torch.nn.ModuleList):
            return list(getattr(encoder, name))
    raise SettingsError(f"--fsdp: cannot find the decoder blocks of {type(hf).__name__} to shard")


def is_sharded(model):
    return isinstance(model, FSDPModule)


# Every function below is a collective: every rank must call it, not only rank 0.

def full_model_state(model):
    """The whole model's weights on rank 0 (an empty dict on the others)."""
    return get_model_state_dict(model, options=FULL)


def save_sharded(folder, model, optimizer):
    """Each rank writes its own shards of the trainable weights and their AdamW state
    (torch.distributed.checkpoint) into `folder`: no rank ever holds the whole state."""
    dcp.save({"model": get_model_state_dict(model, options=TRAINABLE),
              "optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)


def load_sharded(folder, model, optimizer):
    state = {"model": get_model_state_dict(model, options=TRAINABLE),
             "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)  # fills the shards of `state` in place
    # not strict: the frozen weights are absent by design; a missing trainable one fails in dcp.load
    set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
