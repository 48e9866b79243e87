"""Data: file readers -> `Pair` / `UnlabeledPair`; the templates of both model kinds;
tokenization with left truncation of the prompt; one collator per model kind.

A prompt is always a list of messages `[{"role", "content"}]` once read; a plain string in a
file is one user turn. Every reader error names the file, the line (or array item) and the
field, and is raised before any training starts.
"""
import gzip
import json
import os
from dataclasses import dataclass, field

import torch

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    pass


@dataclass
class Pair:
    """A labeled preference: `chosen` is better than `rejected` for `prompt`."""
    prompt: list
    chosen: str
    rejected: str
    margin: float = 0.0
    extra: dict = field(default_factory=dict)  # the row's other fields, passed through


@dataclass
class UnlabeledPair:
    """A pair with no label for training. `gold` ('a', 'b' or None) is for reporting only."""
    prompt: list
    response_a: str
    response_b: str
    row: dict  # the input row as read, written back out with the scores
    gold: str = None


# ----------------------------------------------------------------------------- reading files

def read_rows(path):
    """Yield (where, row) for a .jsonl, .jsonl.gz or .json (array) file; `where` is 'file:line'."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON array: report the item number
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(items, 1):
            yield f"{path}: item {i}", _as_object(row, f"{path}: item {i}")
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        yield f"{path}:{i}", _as_object(row, f"{path}:{i}")


def _as_object(row, where):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _text(row, key, where):
    if key not in row:
        raise DataError(f"{where}: field '{key}' is missing")
    value = row[key]
    if isinstance(value, list) and len(value) == 1:  # [{"role": "assistant", "content": ...}]
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(value.get("content"), str):
            raise DataError(f"{where}: field '{key}' must be a string or one assistant message")
        value = value["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _prompt(row, where):
    if "prompt" not in row:
        raise DataError(f"{where}: field 'prompt' is missing")
    value = row["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field 'prompt[{i}]' must be {{'role': system|user|assistant, "
                            f"'content': string}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def pair_from_row(row, where):
    prompt, chosen, rejected = _prompt(row, where), _text(row, "chosen", where), _text(row, "rejected", where)
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(f"{where}: field 'margin' must be a number")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin")}
    return Pair(prompt, chosen, rejected, float(margin), extra)


def unlabeled_from_row(row, where):
    prompt, a, b = _prompt(row, where), _text(row, "response_a", where), _text(row, "response_b", where)
    gold = row.get("label")
    if gold is not None and gold not in ("a", "b"):
        raise DataError(f"{where}: field 'label' must be 'a' or 'b'")
    if gold is None and isinstance(row.get("chosen"), str):
        gold = "a" if row["chosen"] == a else "b" if row["chosen"] == b else None
    return UnlabeledPair(prompt, a, b, row, gold)


def load_pairs(path):
    """Read every labeled pair of a file; the first bad row stops with file, line and field."""
    pairs = [pair_from_row(row, where) for where, row in read_rows(path)]
    if not pairs:
        raise DataError(f"{path}: no rows")
    return pairs


def load_unlabeled(path):
    pool = [unlabeled_from_row(row, where) for where, row in read_rows(path)]
    if not pool:
        raise DataError(f"{path}: no rows")
    return pool


# ----------------------------------------------------------------------------- templates

def render_context(messages):
    """The pair-pm rendering of a conversation (SPEC 1a)."""
    turns = "".join(f"\n\n<turn> {m['role']}\n {m['content']}" for m in messages)
    return "\n" + turns + "\n\n\n"


def pm_instruction(messages, first, second):
    """The one user message a pairwise model reads; it answers `A` (first better) or `B`."""
    return f"[CONTEXT] {render_context(messages)} [RESPONSE A] {first} [RESPONSE B] {second} \n"


def single_token_id(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the label {text!r} must be exactly one token for this tokenizer, "
                         f"but encodes to {ids}: a pairwise model (SPEC 1a) needs single-token labels")
    return ids[0]


class Encoder:
    """Renders and tokenizes pairs for one model kind, truncating over-long prompts.

    pm: one sequence per ordered pair; the label token (`A`/`B`) is predicted at its last
        position (after the chat template's assistant header, or after the plain instruction).
    rm: one sequence per (prompt, response); the reward is read at its end.
    Truncation drops tokens from the left of the conversation body (the instruction for pm,
    the prompt then the response for rm) and never touches the template's head or tail, so
    the label position and the end of the response always survive.
    """

    def __init__(self, tokenizer, model_type, max_length):
        if not tokenizer.is_fast:
            raise ValueError("selfrm needs a fast (Rust) tokenizer: it uses offset mappings to truncate")
        self.tokenizer, self.model_type, self.max_length = tokenizer, model_type, max_length
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.label_ids = {}
        if model_type == "pm":
            self.label_ids = {"A": single_token_id(tokenizer, "A"), "B": single_token_id(tokenizer, "B")}
        self.truncated = 0  # examples that lost tokens, since this encoder was made

    def pm_text(self, prompt, first, second):
        body = pm_instruction(prompt, first, second)
        if not self.chat:
            return body, (0, len(body))
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                  add_generation_prompt=True)
        return text, _span(text, body)

    def rm_text(self, prompt, response):
        if not self.chat:
            text = render_context(prompt + [{"role": "assistant", "content": response}])
            return text, (0, len(text))
        messages = prompt + [{"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        start, _ = _span(text, prompt[0]["content"])
        _, end = _span(text, response, last=True)
        return text, (start, end)

    def encode(self, texts_and_spans, chunk=1024):
        """Token ids of each (text, body span), truncated from the body's left to max_length."""
        out = []
        for i in range(0, len(texts_and_spans), chunk):
            part = texts_and_spans[i:i + chunk]
            enc = self.tokenizer([t for t, _ in part], add_special_tokens=not self.chat,
                                 return_offsets_mapping=True, return_special_tokens_mask=True)
            for (_, (lo, hi)), ids, offsets, special in zip(part, enc["input_ids"], enc["offset_mapping"],
                                                            enc["special_tokens_mask"]):
                out.append(self._truncate(ids, offsets, special, lo, hi))
        return out

    def _truncate(self, ids, offsets, special, lo, hi):
        excess = len(ids) - self.max_length
        if excess <= 0:
            return ids
        body = [i for i, ((s, e), sp) in enumerate(zip(offsets, special)) if not sp and s >= lo and e <= hi]
        if len(body) <= excess:
            raise ValueError(f"max_length={self.max_length} leaves no room for the text: the template "
                             f"alone takes {len(ids) - len(body)} tokens")
        self.truncated += 1
        drop = set(body[:excess])
        return [t for i, t in enumerate(ids) if i not in drop]

    # -- what the training loop and the scorers consume

    def encode_train(self, pairs, swaps):
        """Training examples. pm: chosen goes to B where swaps[i] (the label is then `B`)."""
        if self.model_type == "pm":
            texts = [self.pm_text(p.prompt, p.rejected, p.chosen) if s else self.pm_text(p.prompt, p.chosen, p.rejected)
                     for p, s in zip(pairs, swaps)]
            labels = [self.label_ids["B" if s else "A"] for s in swaps]
            return [{"input_ids": ids, "label": y} for ids, y in zip(self.encode(texts), labels)]
        ids = self.encode([self.rm_text(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)])
        return [{"chosen_ids": ids[2 * i], "rejected_ids": ids[2 * i + 1], "margin": p.margin}
                for i, p in enumerate(pairs)]

    def encode_score(self, prompts, firsts, seconds):
        """Scoring inputs for each pair, in pair order: pm -> both orders (first, second) and
        (second, first); rm -> the two responses. Two id lists per pair."""
        if self.model_type == "pm":
            texts = [t for p, a, b in zip(prompts, firsts, seconds)
                     for t in (self.pm_text(p, a, b), self.pm_text(p, b, a))]
        else:
            texts = [t for p, a, b in zip(prompts, firsts, seconds) for t in (self.rm_text(p, a), self.rm_text(p, b))]
        ids = self.encode(texts)
        return [(ids[2 * i], ids[2 * i + 1]) for i in range(len(prompts))]


def _span(text, part, last=False):
    """Character span of `part` in `text`; templates may trim the content, so try that too."""
    for candidate in (part, part.strip()):
        i = text.rfind(candidate) if last else text.find(candidate)
        if i >= 0 and candidate:
            return i, i + len(candidate)
    return 0, len(text)  # a template that rewrites the content: the whole text is the body


# ----------------------------------------------------------------------------- collators

def pad_right(seqs, pad_id):
    """(B, T) ids padded on the right to the longest, and the attention mask."""
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    return input_ids, attention_mask


def collate_pm(examples, pad_id):
    """-> input_ids, attention_mask (B, T); label_positions, labels (B,): the label token's
    id, predicted from the hidden state at label_positions (the last real token)."""
    input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "label_positions": attention_mask.sum(1) - 1,
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


def collate_rm(examples, pad_id):
    """-> input_ids, attention_mask (2B, T): the B chosen sequences, then the B rejected
    ones, so one forward scores both; margins (B,)."""
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    input_ids, attention_mask = pad_right(seqs, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "margins": torch.tensor([e["margin"] for e in examples], dtype=torch.float32)}


def example_length(example):
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example["chosen_ids"]), len(example["rejected_ids"]))
