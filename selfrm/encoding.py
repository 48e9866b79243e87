"""Rendering, tokenizing and truncation: the `Encoder` turns pairs into one model kind's id lists
(the templates and the cutting rules: selfrm/templates.py; the rule on numbers: keep_lengths).
"""
from selfrm.formats import DataError
from selfrm.settings import InputError
from selfrm.templates import ChatTemplate, context_parts, join, pm_parts, segment_tokens


def single_token_id(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the label {text!r} must be exactly one token for this tokenizer, "
                         f"but encodes to {ids}: a pairwise model (SPEC 1a) needs single-token labels")
    return ids[0]


class Encoder:
    """Renders and tokenizes pairs for one model kind, at most max_length tokens each.

    pm: one sequence per ordered pair, the instruction of SPEC 1a as one user message through
        the chat template (or plain); the label token (`A`/`B`) is predicted at its last
        position, after the assistant header.
    rm: one sequence per (prompt, response), the response as the assistant turn; the reward
        is read at its end.
    A sequence longer than max_length is truncated by the rules of selfrm/templates.py
    (content only, never the template) or, with overlong='drop', left out of training.
    `truncated` and `dropped` count pairs since this encoder was made.
    """

    def __init__(self, tokenizer, model_type, max_length, overlong="truncate"):
        if not tokenizer.is_fast:
            raise ValueError("selfrm needs a fast (Rust) tokenizer: it uses offset mappings to truncate")
        if not tokenizer("selfrm", add_special_tokens=False)["input_ids"]:  # every pair would be empty
            raise InputError(f"the tokenizer ({type(tokenizer).__name__}, the class transformers chose for this "
                             f"model) turns text into no tokens: it does not match the model's tokenizer files")
        self.tokenizer, self.model_type, self.max_length, self.overlong = tokenizer, model_type, max_length, overlong
        self.chat = ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else None
        self.label_ids = {}
        if model_type == "pm":
            self.label_ids = {"A": single_token_id(tokenizer, "A"), "B": single_token_id(tokenizer, "B")}
        self.truncated = self.dropped = 0

    # -- rendering (as parts: see templates.py)

    def pm_sequence(self, prompt, first, second):
        body = pm_parts(prompt, first, second)
        return self.chat.parts([("user", body)], add_generation_prompt=True) if self.chat else body

    def rm_sequence(self, prompt, response, index=0):
        """`index` names the response's segment: ("response", index)."""
        if not self.chat:
            parts = context_parts(prompt + [{"role": "assistant", "content": response}], last_is_response=True)
            return [(t, ("response", index) if seg == ("response", 0) else seg) for t, seg in parts]
        return self.chat.parts([(m["role"], [(m["content"], ("turn", i))]) for i, m in enumerate(prompt)] +
                               [("assistant", [(response, ("response", index))])])

    def pm_text(self, prompt, first, second):
        return join(self.pm_sequence(prompt, first, second))

    def rm_text(self, prompt, response):
        return join(self.rm_sequence(prompt, response))

    def minimum_length(self):
        """Tokens of the shortest sequence this encoder can make: the template with one
        token of context and of each response (max_length below it fits no pair)."""
        one = [{"role": "user", "content": "A"}]
        parts = self.pm_sequence(one, "A", "B") if self.model_type == "pm" else self.rm_sequence(one, "A")
        return len(self._tokenize(parts, offsets=False))

    # -- tokenizing and fitting

    def _tokenize(self, parts, offsets=True):
        enc = self.tokenizer(join(parts), add_special_tokens=self.chat is None, return_offsets_mapping=offsets,
                             return_special_tokens_mask=offsets)
        if not offsets:
            return enc["input_ids"]
        return enc["input_ids"], segment_tokens(parts, enc["offset_mapping"], enc["special_tokens_mask"])

    def encode_examples(self, examples, drop=False, chunk=512):
        """examples: (prompt, responses, render, where); render(prompt, responses) -> list of
        parts (the sequences of one example). Returns per example (its list of id lists, or
        None where drop=True and it is too long; whether it was cut). Examples that fit are
        tokenized in batches; only over-long ones go through fit()."""
        out = []
        for i in range(0, len(examples), chunk):
            part = examples[i:i + chunk]
            rendered = [render(prompt, responses) for prompt, responses, render, _ in part]
            flat = self.tokenizer([join(p) for seqs in rendered for p in seqs], add_special_tokens=self.chat is None)
            ids = iter(flat["input_ids"])
            for (prompt, responses, render, where), seqs in zip(part, rendered):
                mine = [next(ids) for _ in seqs]
                if max(map(len, mine)) <= self.max_length:
                    out.append((mine, False))
                else:
                    out.append((None if drop else self.fit(prompt, responses, render, where), True))
        return out

    def fit(self, prompt, responses, render, where):
        """The sequences of one example cut to max_length by the rules of templates.py. Every
        sequence of the example (both orders of a pm pair; chosen and rejected of an rm pair)
        keeps the same context and the same text of each response."""
        L = self.max_length
        for k in range(len(prompt)):  # the fewest oldest turns to drop so that the template fits
            kept = prompt[k:]
            tokenized = [self._tokenize(parts) for parts in render(kept, responses)]
            segs = tokenized[0][1]
            context = [segs.get(("turn", i), []) for i in range(len(kept))]
            n_context = sum(map(len, context))
            spans = {}  # response j's token spans, from the first sequence that holds it (pm: ("response", j) is a slot)
            for _, s in tokenized:
                spans.update({j: s[("response", j)] for j in range(len(responses)) if ("response", j) in s and j not in spans})
            n_responses = [len(spans.get(j, [])) for j in range(len(responses))]
            members = [[j for j in range(len(responses)) if ("response", j) in s] for _, s in tokenized]
            fixed = [len(ids) - n_context - sum(n_responses[j] for j in m) for (ids, _), m in zip(tokenized, members)]
            if all(f + min(1, n_context) + sum(n_responses[j] for j in m) <= L for f, m in zip(fixed, members)):
                break
        needed = max(f + min(1, n_context) + len(m) for f, m in zip(fixed, members))  # one token of context and of each response
        text = {}
        for parts in render(kept, responses):
            text.update({seg: t for t, seg in parts if seg is not None and seg not in text})
        extra = 0  # tokens that re-tokenizing the cut text added (merges at the cut)
        for _ in range(8):
            keep = keep_lengths(n_context, n_responses, fixed, members, L - extra)
            if keep is None:
                break
            keep_context, keep_responses = keep
            new_prompt = cut_context(kept, context, text, n_context - keep_context)
            new_responses = [text.get(("response", j), r)[:spans[j][n - 1][1]] if n < n_responses[j] else r
                             for j, (r, n) in enumerate(zip(responses, keep_responses))]
            seqs = [self._tokenize(p, offsets=False) for p in render(new_prompt, new_responses)]
            over = max(map(len, seqs)) - L
            if over <= 0:
                return seqs
            extra += over
        raise DataError(f"{where or 'a pair'}: does not fit in max_length={L}: the template with one token of context "
                        f"and of each response needs {needed} tokens; use --max_length={needed} or more")

    # -- what the training loop and the scorers consume

    def encode_train(self, pairs, swaps):
        """Training examples. pm: chosen goes to B where swaps[i] (the label is then `B`).
        With overlong='drop', pairs longer than max_length are left out."""
        drop = self.overlong == "drop"
        if self.model_type == "pm":
            one_order = lambda prompt, r: [self.pm_sequence(prompt, r[0], r[1])]
            encoded = self.encode_examples([(p.prompt, [p.rejected, p.chosen] if s else [p.chosen, p.rejected],
                                             one_order, p.where) for p, s in zip(pairs, swaps)], drop)
            self._count(encoded)
            return [{"input_ids": ids[0], "label": self.label_ids["B" if s else "A"], "prob": p.prob, "where": p.where}
                    for (ids, _), s, p in zip(encoded, swaps, pairs) if ids is not None]
        encoded = self._rm_pairs([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
                                 [p.where for p in pairs], drop)
        return [{"chosen_ids": c, "rejected_ids": r, "margin": p.margin, "prob": p.prob, "where": p.where}
                for (c, r), p in zip(encoded, pairs) if c is not None]

    def encode_score(self, prompts, firsts, seconds, wheres=None):
        """Scoring inputs for each pair, in pair order: pm -> both orders (first, second) and
        (second, first), cut alike; rm -> the two responses. Two id lists per pair. Every
        pair is truncated to fit (scoring never drops)."""
        wheres = wheres or [None] * len(prompts)
        if self.model_type == "rm":
            return self._rm_pairs(prompts, firsts, seconds, wheres)
        both = lambda prompt, r: [self.pm_sequence(prompt, r[0], r[1]), self.pm_sequence(prompt, r[1], r[0])]
        encoded = self.encode_examples([(p, [a, b], both, w) for p, a, b, w in zip(prompts, firsts, seconds, wheres)])
        self._count(encoded)
        return [tuple(ids) for ids, _ in encoded]

    def _rm_pairs(self, prompts, firsts, seconds, wheres, drop=False):
        """(ids of first, ids of second) per pair; (None, None) for a dropped pair. The two
        sequences of a pair are one example: one context cut, so both rewards read the same
        context."""
        both = lambda prompt, r: [self.rm_sequence(prompt, r[0], 0), self.rm_sequence(prompt, r[1], 1)]
        encoded = self.encode_examples([(p, [a, b], both, w) for p, a, b, w in zip(prompts, firsts, seconds, wheres)],
                                       drop)
        self._count(encoded)
        return [tuple(ids) if ids is not None else (None, None) for ids, _ in encoded]

    def _count(self, encoded):
        self.dropped += sum(ids is None for ids, _ in encoded)
        self.truncated += sum(ids is not None and cut for ids, cut in encoded)


def keep_lengths(n_context, n_responses, fixed, members, max_length):
    """The truncation rule on numbers: balanced. Every content segment (the context, each
    response) keeps min(its length, L) tokens, for the largest L at which every sequence fits:
    the longest segment is cut first, down to the next longest, then both together, and so on.
    Sequence s holds `fixed[s]` template tokens, the context and the responses `members[s]`
    (pm: one sequence, or both orders, holding both responses; rm: the chosen and the rejected
    sequence, one response each, the same context). Returns (context kept, [kept per
    response]), or None when even one token of each does not fit. Tokens that no L can use
    (budget 10 over three long segments: L = 3, 9 used) stay unused: the segments stay level."""
    def fits(L):
        return all(f + min(n_context, L) + sum(min(n_responses[j], L) for j in m) <= max_length
                   for f, m in zip(fixed, members))
    if not fits(1):
        return None
    low, high = 1, max([n_context, *n_responses, 1])
    while low < high:  # the largest L that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return min(n_context, low), [min(n, low) for n in n_responses]


def cut_context(prompt, context_tokens, text, drop):
    """The prompt without its `drop` oldest content tokens (roles and turns stay)."""
    out = []
    for i, (m, tokens) in enumerate(zip(prompt, context_tokens)):
        content = text.get(("turn", i), m["content"])
        if drop >= len(tokens):
            content, drop = ("" if tokens else content), drop - len(tokens)
        elif drop > 0:
            content, drop = content[tokens[drop][0]:], 0
        out.append({"role": m["role"], "content": content})
    return out
