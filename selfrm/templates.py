"""What the model reads: the two templates (SPEC 1a, 1b) and truncation that keeps them.

A rendered sequence is a list of parts `(text, segment)`: `segment` is None for template
text, which is never cut (chat-template head and tail, the pair-pm instruction words and
markers, role headers), or names the conversation content it holds: ("turn", i) for the
i-th prompt message, ("response", j) for the j-th response. Truncation cuts only content,
balanced over the content segments (the context, each response; encoding.keep_lengths):

1. every segment keeps min(its length, L) tokens for the largest L that fits: the longest is
   cut first, down to the next longest, then both together, and so on (each keeps at least
   one token); the context loses its oldest tokens, a response its last ones;
2. when even the role headers do not fit, the oldest whole turns (header and content) go
   first; the newest turn stays.
The cut is decided on the text, and every sequence of an example is rendered from the same
cut text: both orders of a pairwise example, and the chosen and rejected sequences of a
scalar pair, carry the same context and the same responses.
"""
import re

# ----------------------------------------------------------------------------- the pair-pm text (SPEC 1a)


def context_parts(messages, last_is_response=False):
    """The official pair-pm rendering of a conversation:
    "\\n" + "".join("\\n<turn> " + role + "\\n " + content per turn) + "\\n"."""
    parts = [("\n", None)]
    for i, m in enumerate(messages):
        last = last_is_response and i == len(messages) - 1
        parts += [(f"\n<turn> {m['role']}\n ", None), (m["content"], ("response", 0) if last else ("turn", i))]
    return parts + [("\n", None)]


def pm_parts(messages, first, second):
    """`[CONTEXT] {context} [RESPONSE A] {first} [RESPONSE B] {second} \\n` as parts."""
    return [("[CONTEXT] ", None), *context_parts(messages), (" [RESPONSE A] ", None), (first, ("response", 0)),
            (" [RESPONSE B] ", None), (second, ("response", 1)), (" \n", None)]


def join(parts):
    return "".join(text for text, _ in parts)


def render_context(messages):
    return join(context_parts(messages))


def pm_instruction(messages, first, second):
    """The one user message a pairwise model reads; it answers `A` (first better) or `B`."""
    return join(pm_parts(messages, first, second))


# ----------------------------------------------------------------------------- chat templates

SENTINEL = re.compile("\ue000(\\d+)\ue001")


class ChatTemplate:
    """The tokenizer's chat template, rendered with a sentinel in place of each message's
    content so that the template's own text is known exactly; the real text is then the
    template pieces with the content parts between them. Templates that trim the content
    (Llama 3, Gemma) are followed: the content's outer whitespace is dropped."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pieces = {}  # (roles, add_generation_prompt) -> the template text between contents

    def parts(self, messages, add_generation_prompt=False):
        """messages: [(role, content parts)] -> the whole sequence as parts."""
        key = (tuple(role for role, _ in messages), add_generation_prompt)
        if key not in self.pieces:
            text = self.tokenizer.apply_chat_template(
                [{"role": role, "content": f"\ue000{k}\ue001"} for k, (role, _) in enumerate(messages)],
                tokenize=False, add_generation_prompt=add_generation_prompt)
            pieces = SENTINEL.split(text)  # fixed, 0, fixed, 1, ..., fixed
            if pieces[1::2] != [str(k) for k in range(len(messages))]:
                raise ValueError("the tokenizer's chat template drops or reorders messages: selfrm cannot "
                                 "render pairs through it")
            self.pieces[key] = pieces[0::2]
        real = self.tokenizer.apply_chat_template([{"role": role, "content": join(content)} for role, content in messages],
                                                  tokenize=False, add_generation_prompt=add_generation_prompt)
        for transform in (lambda c: c, strip_parts):
            out = [(self.pieces[key][0], None)]
            for (_, content), piece in zip(messages, self.pieces[key][1:]):
                out += transform(content) + [(piece, None)]
            if join(out) == real:
                return [(t, s) for t, s in out if t]
        raise ValueError("the tokenizer's chat template rewrites message content (beyond trimming it): selfrm "
                         "cannot locate the text it may truncate")


def strip_parts(parts):
    """Content parts with the outer whitespace of the whole content removed (jinja's `trim`)."""
    parts = [list(p) for p in parts]
    for i in range(len(parts)):
        parts[i][0] = parts[i][0].lstrip()
        if parts[i][0]:
            break
    for i in reversed(range(len(parts))):
        parts[i][0] = parts[i][0].rstrip()
        if parts[i][0]:
            break
    return [tuple(p) for p in parts]


# ----------------------------------------------------------------------------- tokens per segment

def segment_tokens(parts, offsets, special):
    """For each content segment, the character spans (relative to the segment's text, outer
    whitespace excluded) of the tokens that lie inside it. A token's surrounding whitespace does not count (' Yes' after
    `[RESPONSE A]` belongs to the response); a token that straddles template text is
    template (never cut)."""
    spans, pos = {}, 0
    for text, seg in parts:
        if seg is not None:
            spans[seg] = (pos, pos + len(text))
        pos += len(text)
    full = join(parts)
    out = {seg: [] for seg in spans}
    ordered = sorted(spans.items(), key=lambda kv: kv[1])
    j = 0
    for (s, e), sp in zip(offsets, special):
        if sp or s == e:
            continue
        s2, e2 = s, e
        while s2 < e2 and full[s2].isspace():
            s2 += 1
        while e2 > s2 and full[e2 - 1].isspace():
            e2 -= 1
        if s2 == e2:  # a whitespace-only token: where it stands
            s2, e2 = s, e
        while j < len(ordered) and ordered[j][1][1] <= s2:
            j += 1
        if j < len(ordered):
            seg, (lo, hi) = ordered[j]
            if lo <= s2 and e2 <= hi:  # cut points at its first and last non-space character
                out[seg].append((s2 - lo, e2 - lo))
    return out
