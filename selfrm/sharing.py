"""Both batch layouts of a pair's two sequences: padded (pad_right: one row per sequence,
padded on the right to the longest), and shared-prefix (one row, the common prefix once).

Shared-prefix: the two (rm: chosen and rejected; pm scoring: the two orders) agree up to
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
import sys

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from selfrm.dist import print0
from selfrm.settings import SettingsError

# model_type -> how its decoder takes a ready mask: "one" tensor for every layer (Mistral's
# window, when it has one, applies to all of them), or a dict "by_type" of layer type
# (config.layer_types: full_attention, sliding_attention) -> mask
SHARED_ARCHITECTURES = {"llama": "one", "mistral": "one", "qwen2": "by_type", "gemma2": "by_type"}
MASKABLE_ATTENTION = ("sdpa", "eager")  # flash attention takes no custom mask; flex takes a BlockMask


# ----------------------------------------------------------------------------- the layouts (numbers)

def pad_right(seqs, pad_id):
    """(B, T) ids padded on the right to the longest, and the attention mask."""
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    return input_ids, attention_mask


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
    mask, or a dict by layer type (the sliding layers with config.sliding_window); each is
    split_plan's, for split_attention."""
    window = getattr(config, "sliding_window", None)
    if SHARED_ARCHITECTURES[config.model_type] == "one":
        return split_plan(segment_ids, position_ids, window, dtype)
    return {"full_attention": split_plan(segment_ids, position_ids, None, dtype),
            "sliding_attention": split_plan(segment_ids, position_ids, window, dtype)}


# ----------------------------------------------------------------------------- split attention
# sdpa and eager compute every score of a row, masked or not: (P + S1 + S2)^2 per row, more
# than the 2 (P + S)^2 of two separate sequences when P is short. Split, the scores computed
# are (P + S1)^2 (the prefix and suffix 1: the row's first columns) plus S2 (P + S2) (suffix 2's
# queries against the prefix and suffix 2, gathered): never more than separate sequences, and
# the row's whole (T, T) mask is never built. Each part goes through the model's own attention
# (sdpa, or its eager with Gemma-2's soft-capping); the first shared forward wraps the model's
# attention implementation (split_attention_on), which passes every other call through.

SPLIT = "selfrm_split:"  # the wrapped implementations' names: SPLIT + "sdpa" | "eager"


def split_plan(segment_ids, position_ids, window, dtype):
    """Part 1's additive mask (B, 1, F, F): pair_attention on the first F columns, F the batch's
    longest prefix + suffix 1. It carries the plan of part 2 (attribute split_plan; transformers
    passes a ready 4D mask, or a dict's entries, to the attention function as the same tensor):
    query_cols (B, S2), the columns of suffix 2's queries (pad slots: a dummy column T);
    key_cols (B, P + S2), its keys, the prefix then suffix 2, whose positions are their indices
    m (the query j's is P + j); mask_2 (B, 1, S2, P + S2), additive: m <= P + j, m a key of
    the row, P + j - m < window (a pad slot attends to key 0: no query row fully masked)."""
    width = segment_ids.shape[1]
    prefix, first, second = ((segment_ids == s).sum(1, keepdim=True) for s in (0, 1, 2))
    start = prefix + first
    part_1 = int(start.max())
    mask_1 = additive(pair_attention(segment_ids[:, :part_1], position_ids[:, :part_1], window), dtype)
    j = torch.arange(int(second.max()), device=segment_ids.device)[None]
    m = torch.arange(int((prefix + second).max()), device=segment_ids.device)[None, None]
    query_position = (prefix + j)[:, :, None]
    allowed = (m <= query_position) & (m < (prefix + second)[:, :, None])
    if window is not None:
        allowed &= query_position - m < window
    allowed[:, :, 0] |= j >= second
    mask_1.split_plan = {"query_cols": torch.where(j < second, start + j, width),
                         "key_cols": torch.where(m[0] < prefix, m[0], start + m[0] - prefix).clamp(max=width - 1),
                         "mask_2": additive(allowed[:, None], dtype)}
    return mask_1


def split_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function (transformers' interface: query (B, H, T, D), key and value
    (B, H_kv, T, D) -> output (B, T, H, D), weights) that computes a layout's attention in the
    two parts above through the wrapped implementation, and any other call through it whole."""
    inner = wrapped_attention(module)
    plan = getattr(attention_mask, "split_plan", None)
    if plan is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    width, part_1 = query.shape[2], attention_mask.shape[-1]
    first, _ = inner(module, query[:, :, :part_1], key[:, :, :part_1], value[:, :, :part_1], attention_mask, **kwargs)
    gather = lambda t, cols: t.gather(2, cols[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
    queries = plan["query_cols"].clamp(max=width - 1)
    second, _ = inner(module, gather(query, queries), gather(key, plan["key_cols"]), gather(value, plan["key_cols"]),
                      plan["mask_2"], **kwargs)
    # part 1's outputs, then suffix 2's written over its columns (pad slots into a dummy column T)
    out = torch.cat([first, first.new_zeros(first.shape[0], width + 1 - part_1, *first.shape[2:])], 1)
    index = plan["query_cols"][:, :, None, None].expand(-1, -1, *second.shape[2:])
    return out.scatter(1, index, second)[:, :width], None


def wrapped_attention(module):
    """The implementation split_attention wraps: sdpa, or the eager function of the module's
    own modeling file (Gemma-2's soft-caps its scores)."""
    name = module.config._attn_implementation.removeprefix(SPLIT)
    if name == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sys.modules[type(module).__module__].eager_attention_forward


def split_attention_on(config):
    """Make the model's attention split_attention (once; masks for other calls as before)."""
    name = config._attn_implementation
    if not name.startswith(SPLIT):
        config._attn_implementation = SPLIT + name


for _name in MASKABLE_ATTENTION:
    AttentionInterface.register(SPLIT + _name, split_attention)
    AttentionMaskInterface.register(SPLIT + _name, ALL_MASK_ATTENTION_FUNCTIONS[_name])


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
    attention = config._attn_implementation.removeprefix(SPLIT)
    if attention not in MASKABLE_ATTENTION:
        return f"{arch} runs {attention} attention, which takes no custom mask (sdpa and eager do)"
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
