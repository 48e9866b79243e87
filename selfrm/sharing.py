"""The shared-prefix layout: the two sequences of a pair in one row, their common prefix
computed once.

A pair's two sequences (rm: chosen and rejected; pm scoring: the two orders) agree up to
P tokens, P their longest common token prefix (at most the shorter length - 1, so each
sequence keeps its last token in its own suffix). One row holds

    columns   [ prefix: 0..P-1 | suffix 1: P..P+S1-1 | suffix 2: P+S1..P+S1+S2-1 | pad ]
    positions [ 0..P-1         | P..P+S1-1           | P..P+S2-1                 | 0   ]
    segments  [ 0              | 1                   | 2                         | -1  ]

and query q may attend key k when k <= q (columns), k is in the prefix or in q's own suffix,
and, in a sliding-window layer of width W, pos(q) - pos(k) < W (positions, not columns: the
distance within the sequence the token belongs to). Suffix 2 so sees exactly what it sees
in its own sequence, at the same positions: the hidden states, and so the reward or the label
logits read at each suffix's end, are those of two separate forwards. A pad query attends to
itself only (a row that attends to nothing gives NaN in the softmax).

Exact only for decoders with rotary positions (position ids carry the restart) that take a
custom mask per layer type: the architectures of SHARED_ARCHITECTURES, under sdpa or eager
attention. An encoder (BERT, MiniLM) attends both ways, so its prefix states depend on the
suffix: nothing can be shared.
"""
import torch

from selfrm.dist import print0
from selfrm.settings import SettingsError

# model_type -> how its decoder takes a ready mask: "one" tensor for every layer (Mistral's
# window, when it has one, applies to all of them), or a dict "by_type" of layer type
# (config.layer_types: full_attention, sliding_attention) -> mask
SHARED_ARCHITECTURES = {"llama": "one", "mistral": "one", "qwen2": "by_type", "gemma2": "by_type"}
MASKABLE_ATTENTION = ("sdpa", "eager")  # flash attention takes no custom mask; flex takes a BlockMask


# ----------------------------------------------------------------------------- the layout (numbers)

def shared_length(first, second):
    """P: the longest common prefix of two id lists, cut to leave each at least one token."""
    limit = min(len(first), len(second)) - 1
    p = 0
    while p < limit and first[p] == second[p]:
        p += 1
    return p


def last_non_pad(ids, pad_id):
    """The index a sequence classifier reads its score at: the last token that is not the pad
    id (transformers' rule for right-padded rows), 0 when there is none."""
    return max((i for i, t in enumerate(ids) if t != pad_id), default=0)


def last_token(ids, pad_id):
    """The label position of a pm sequence: its last token."""
    return len(ids) - 1


def pack_pairs(pairs, pad_id, read_at):
    """pairs: (ids 1, ids 2) per pair -> a batch of one row per pair (the layout above), padded
    on the right to the longest row: input_ids, position_ids, segment_ids (B, T) and
    read_positions (B, 2), the column of read_at(ids, pad_id) of each sequence."""
    rows = []
    for first, second in pairs:
        p = shared_length(first, second)
        s1, s2 = len(first) - p, len(second) - p
        columns = lambda i, start: i if i < p else start + i - p  # index in a sequence -> column in the row
        rows.append((first + second[p:], list(range(p + s1)) + list(range(p, p + s2)),
                     [0] * p + [1] * s1 + [2] * s2,
                     [columns(read_at(first, pad_id), p), columns(read_at(second, pad_id), p + s1)]))
    width = max(len(ids) for ids, _, _, _ in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
             "segment_ids": torch.full((len(rows), width), -1, dtype=torch.long),
             "read_positions": torch.tensor([r[3] for r in rows], dtype=torch.long).reshape(len(rows), 2)}
    for b, (ids, positions, segments, _) in enumerate(rows):
        batch["input_ids"][b, :len(ids)] = torch.tensor(ids)
        batch["position_ids"][b, :len(ids)] = torch.tensor(positions)
        batch["segment_ids"][b, :len(ids)] = torch.tensor(segments)
    return batch


def unshared_tokens(pairs):
    """Tokens two separate sequences per pair hold; the layout holds sum(len 1 + len 2 - P)."""
    return sum(len(a) + len(b) for a, b in pairs)


# ----------------------------------------------------------------------------- the mask

def pair_attention(segment_ids, position_ids, window=None):
    """(B, 1, T, T) bool, True where query q may attend key k: k <= q, k not padding, k in the
    prefix (segment 0) or in q's own segment, and pos(q) - pos(k) < window when a window is
    given. A pad query attends to itself only."""
    width = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (key == query) | (key == 0)  # (B, T, T); in place from here on: few such tensors at a time
    allowed &= causal
    allowed &= key >= 0
    allowed &= query >= 0
    if window is not None:
        allowed &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    allowed.diagonal(dim1=1, dim2=2).logical_or_(segment_ids < 0)  # a pad query sees itself
    return allowed[:, None]


def additive(allowed, dtype):
    """The mask as sdpa and eager attention both add it to the scores: 0 where allowed, the
    most negative value of the compute dtype elsewhere. Built once for all layers (sdpa would
    turn a bool mask into this in every layer)."""
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def decoder_masks(config, segment_ids, position_ids, dtype):
    """The attention_mask argument of a SHARED_ARCHITECTURES decoder for the layout: one
    tensor, or a dict by layer type (the sliding layers with config.sliding_window)."""
    window = getattr(config, "sliding_window", None)
    if SHARED_ARCHITECTURES[config.model_type] == "one":
        return additive(pair_attention(segment_ids, position_ids, window), dtype)
    return {"full_attention": additive(pair_attention(segment_ids, position_ids), dtype),
            "sliding_attention": additive(pair_attention(segment_ids, position_ids, window), dtype)}


def compute_dtype(backbone, device_type):
    """The dtype attention scores are computed in: autocast's, else the embeddings' (bf16
    frozen weights, or FSDP's bf16 compute, which has cast them by the time of the forward)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return backbone.get_input_embeddings().weight.dtype


# ----------------------------------------------------------------------------- the switch

_said = set()  # auto's decision is printed once per process, not once per round


def unsupported_reason(config):
    """Why the layout would not be exact for this model (None: it is)."""
    arch = config.model_type
    if arch not in SHARED_ARCHITECTURES:
        return (f"{arch} is not one of the architectures where it is exact and tested "
                f"({', '.join(SHARED_ARCHITECTURES)})")
    if config._attn_implementation not in MASKABLE_ATTENTION:
        return f"{arch} runs {config._attn_implementation} attention, which takes no custom mask (sdpa and eager do)"
    return None


def resolve_share_prefix(setting, config):
    """--share_prefix=auto|true|false for a model of this config -> whether to use the layout.
    true on a model it is not exact for is a settings error; auto says its choice in one line."""
    if setting == "false":
        return False
    reason = unsupported_reason(config)
    if setting == "true" and reason:
        raise SettingsError(f"--share_prefix=true: {reason}")
    if setting == "auto":
        line = (f"--share_prefix=auto: {'off' if reason else 'on'} for {config.model_type} "
                f"({reason or 'each pair shares its common prefix in one row, exactly'})")
        if line not in _said:
            _said.add(line)
            print0(line)
    return reason is None
