"""Render conversations with the tokenizer's own chat template, and find the assistant tokens.

The loss mask covers exactly what the model writes in an assistant turn: the turn's content (with its
thinking block where the template renders one) and the end-of-turn token that closes it. It is derived
from the template itself, never from one family's separator strings:

* F = tokens of the whole conversation, rendered once.
* For assistant turn i: C_i = tokens of messages[:i] (no generation prompt) must be a prefix of F, else the
  template is not prefix-stable and we stop with an error. P_i = tokens of messages[:i] with the
  generation prompt. The turn starts where F leaves P_i: after the whole generation prompt when F repeats
  it, earlier when the template renders history turns without part of it (Qwen3 with thinking off writes
  `<think>\\n\\n</think>\\n\\n` in the generation prompt but not in history turns).
* The turn ends at the first end-of-turn token at or after its start (the tokenizer's eos token plus
  `stop_tokens`), inclusive. What the template writes after it (Qwen3/ChatML's "\\n") is a separator the
  model never generates and stays unsupervised.

Qwen3's template drops the `<think>` block of every assistant turn before the last user message; the mask
follows what the template rendered, so those history turns are supervised without their thinking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence


class TemplateError(ValueError):
    """The chat template cannot give assistant spans for this conversation (a template or config problem)."""


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is written by the assistant

    def __len__(self) -> int:
        return len(self.input_ids)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatRenderer:
    """Chat-template rendering + assistant-token mask for one tokenizer and one set of template options."""

    def __init__(self, tokenizer: Any, enable_thinking: bool | None = None, system_prompt: str | None = None,
                 stop_tokens: Iterable[str] = ()):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat "
                                "template; use the instruct model's tokenizer or set tokenizer.chat_template")
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.system_prompt = system_prompt
        self.stop_token_ids = self._stop_ids(tokenizer, stop_tokens)

    @staticmethod
    def _stop_ids(tokenizer: Any, stop_tokens: Iterable[str]) -> set[int]:
        ids = set()
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        for t in stop_tokens:
            tid = tokenizer.convert_tokens_to_ids(t)
            if tid is None or tid == tokenizer.unk_token_id:
                raise TemplateError(f"data.chat_template.stop_tokens: {t!r} is not a single token of this tokenizer")
            ids.add(int(tid))
        if not ids:
            raise TemplateError("the tokenizer has no eos token; name the end-of-turn token in "
                                "data.chat_template.stop_tokens")
        return ids

    # -- rendering

    def with_system(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        msgs = [dict(m) for m in messages]
        if self.system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        """The template's text for already-prepared messages (system prompt applied)."""
        kwargs = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def tokens(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        text = self.render(messages, add_generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> Encoded:
        """A prompt ending with a user turn, plus the generation prompt (history assistant turns masked)."""
        if messages[-1]["role"] != "user":
            raise ValueError(f"encode_prompt: the last turn must be a user turn, got {messages[-1]['role']!r}")
        return self.encode(messages, add_generation_prompt=True)

    def encode(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> Encoded:
        """Tokens of the rendered conversation and the mask of its assistant tokens."""
        msgs = self.with_system(messages)
        full = self.tokens(msgs, add_generation_prompt)
        mask = [0] * len(full)
        floor = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise TemplateError("a conversation cannot start with an assistant turn")
            context = self.tokens(msgs[:i], add_generation_prompt=False)
            if full[: len(context)] != context:
                raise TemplateError(self._unstable(msgs, i, full, context))
            prompt = self.tokens(msgs[:i], add_generation_prompt=True)
            start = max(_lcp(full, prompt), len(context), floor)
            end = next((j for j in range(start, len(full)) if full[j] in self.stop_token_ids), None)
            if end is None:
                tail = self.tokenizer.decode(full[start:start + 40])
                raise TemplateError(
                    f"assistant turn {i}: no end-of-turn token (ids {sorted(self.stop_token_ids)}) after it in the "
                    f"rendered conversation (turn starts {tail!r}); name the token that closes assistant turns in "
                    "data.chat_template.stop_tokens")
            mask[start:end + 1] = [1] * (end + 1 - start)
            floor = end + 1
        return Encoded(full, mask)

    def _unstable(self, msgs, i, full, context) -> str:
        k = _lcp(full, context)
        got = self.tokenizer.decode(full[k:k + 30])
        want = self.tokenizer.decode(context[k:k + 30])
        return (f"chat template is not prefix-stable: rendering the first {i} turns gives {want!r} at token {k}, "
                f"but the whole conversation ({len(msgs)} turns) gives {got!r} there, so assistant turn {i} "
                "cannot be located. Use a template that renders earlier turns the same whatever follows them, "
                "or split the conversation into single-turn records.")


def mask_spans(loss_mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) ranges where loss_mask is 1."""
    spans, start = [], None
    for j, v in enumerate(list(loss_mask) + [0]):
        if v and start is None:
            start = j
        elif not v and start is not None:
            spans.append((start, j))
            start = None
    return spans


def show_mask(tokenizer: Any, input_ids: Sequence[int], loss_mask: Sequence[int],
              open_mark: str = "\u27e6", close_mark: str = "\u27e7") -> str:
    """Decoded text with every supervised span wrapped in markers, for eyeballing a mask:

    >>> print(show_mask(tok, enc.input_ids, enc.loss_mask))
    <|im_start|>user
    hi<|im_end|>
    <|im_start|>assistant
    ⟦hello<|im_end|>⟧
    """
    ids, out, pos = [int(t) for t in input_ids], [], 0
    for a, b in mask_spans(loss_mask):
        out += [tokenizer.decode(ids[pos:a]), open_mark, tokenizer.decode(ids[a:b]), close_mark]
        pos = b
    out.append(tokenizer.decode(ids[pos:]))
    return "".join(out)

