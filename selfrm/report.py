"""What a run shows: the table of rounds, and --preview's training sequences as the model
sees them (the line that ends a round is rundir.round_line)."""
import json

from selfrm import dist

from selfrm.modeling import load_tokenizer
from selfrm.steps import encode_training
from selfrm.trainer import example_length, global_batches, micro_batches

COLUMNS = [("round", "round", "{}"), ("train_size", "train", "{}"), ("pseudo_labeled_share", "pseudo share", "{:.3f}"),
           ("kept", "kept", "{}"), ("status", "status", "{}"), ("pseudo_label_accuracy", "pseudo acc", "{:.4f}"),
           ("eval_accuracy", "eval acc", "{:.4f}"), ("seconds", "seconds", "{:.0f}")]


def format_table(rounds):
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rounds)]
    lines = ["| " + " | ".join(name for _, name, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rounds:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "" for key, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def preview(cfg, pairs, out):
    """Write the first cfg.preview training sequences of round 0 to `out`, exactly as the model
    receives them (rendered, truncated, decoded with special tokens), in the order training
    feeds them (one process): one JSON object a line {"text", "label", "tokens", "source"}, label
    A/B (pm) or chosen/rejected (rm: the two sequences of a pair one after the other), source the
    file:line of the pair."""
    tokenizer = load_tokenizer(cfg)
    examples, encoder = encode_training(cfg, tokenizer, pairs)
    world, name = dist.Dist(), {v: k for k, v in encoder.label_ids.items()}
    lengths = [example_length(e) for e in examples]
    sequences = []
    for batch in global_batches(lengths, cfg, world, 0):
        for micro in micro_batches(batch, cfg, world):
            for e in (examples[i] for i in micro):
                if cfg.model_type == "pm":
                    sequences.append((e["input_ids"], name[e["label"]], e["where"]))
                else:  # a whole pair: its chosen and its rejected sequence
                    sequences += [(e["chosen_ids"], "chosen", e["where"]), (e["rejected_ids"], "rejected", e["where"])]
        if len(sequences) >= cfg.preview:
            break
    sequences = sequences[:cfg.preview + (cfg.preview % 2 if cfg.model_type == "rm" else 0)]  # rm: whole pairs
    for ids, label, where in sequences:
        out.write(json.dumps({"text": tokenizer.decode(ids, skip_special_tokens=False), "label": label,
                              "tokens": len(ids), "source": where}, ensure_ascii=False) + "\n")
    out.flush()
    return sequences
