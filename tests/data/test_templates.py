"""Loss masks from real chat templates: exactly the assistant tokens, derived without family literals."""

import copy

import pytest

from orthrus_train.data import ChatRenderer, TemplateError, mask_spans, show_mask

U = {"role": "user", "content": "What is the capital of France?"}
A = {"role": "assistant", "content": "Paris."}
A_THINK = {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nParis."}
MULTI = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nhello"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "<think>\nok\n</think>\n\nbye"},
]


def spans(tok, enc):
    return [tok.decode(enc.input_ids[a:b]) for a, b in mask_spans(enc.loss_mask)]


def template_ids(tok, msgs, **kw):
    out = tok.apply_chat_template(msgs, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def check_span_ends(tok, enc):
    """Each span ends with the eos token, and the token after a span is not supervised."""
    for a, b in mask_spans(enc.loss_mask):
        assert enc.input_ids[b - 1] == tok.eos_token_id
        assert b == len(enc.input_ids) or enc.loss_mask[b] == 0


# ------------------------------------------------------------------------------------------------ Qwen3


def test_qwen3_thinking_default_single_turn(qwen3_tok):
    enc = ChatRenderer(qwen3_tok).encode([U, A])
    assert enc.input_ids == template_ids(qwen3_tok, [U, A])
    # Thinking on: the template writes an (empty) think block before the answer; the model writes it too.
    assert spans(qwen3_tok, enc) == ["<think>\n\n</think>\n\nParis.<|im_end|>"]
    check_span_ends(qwen3_tok, enc)
    # what precedes the span is exactly the generation prompt
    prompt = ChatRenderer(qwen3_tok).encode_prompt([U])
    assert enc.input_ids[: len(prompt)] == prompt.input_ids and enc.loss_mask[len(prompt)] == 1
    assert not any(enc.loss_mask[: len(prompt)])


def test_qwen3_thinking_on_keeps_reasoning(qwen3_tok):
    enc = ChatRenderer(qwen3_tok, enable_thinking=True).encode([U, A_THINK])
    assert spans(qwen3_tok, enc) == ["<think>\nLet me think.\n</think>\n\nParis.<|im_end|>"]


def test_qwen3_thinking_off_masks_answer_only(qwen3_tok):
    r = ChatRenderer(qwen3_tok, enable_thinking=False)
    enc = r.encode([U, A])
    assert enc.input_ids == template_ids(qwen3_tok, [U, A], enable_thinking=False)
    assert spans(qwen3_tok, enc) == ["Paris.<|im_end|>"]
    prompt = r.encode_prompt([U])
    assert qwen3_tok.decode(prompt.input_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert enc.input_ids[: len(prompt)] == prompt.input_ids  # regenerated rows = prompt + response tokens
    check_span_ends(qwen3_tok, enc)


@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_history_turns_lose_their_think_block(qwen3_tok, thinking):
    """Qwen3's template drops the think block of assistant turns before the last user message."""
    r = ChatRenderer(qwen3_tok, enable_thinking=thinking)
    msgs = MULTI if thinking is not False else MULTI[:3] + [{"role": "assistant", "content": "bye"}]
    enc = r.encode(msgs)
    kw = {} if thinking is None else {"enable_thinking": thinking}
    assert enc.input_ids == template_ids(qwen3_tok, msgs, **kw)
    text = qwen3_tok.decode(enc.input_ids)
    assert "hmm" not in text  # the history reasoning is not in the rendered conversation at all
    final = "<think>\nok\n</think>\n\nbye<|im_end|>" if thinking is not False else "bye<|im_end|>"
    assert spans(qwen3_tok, enc) == ["hello<|im_end|>", final]
    check_span_ends(qwen3_tok, enc)


def test_qwen3_prompt_with_history(qwen3_tok):
    enc = ChatRenderer(qwen3_tok, enable_thinking=False).encode_prompt(MULTI[:3])
    assert spans(qwen3_tok, enc) == ["hello<|im_end|>"]
    assert qwen3_tok.decode(enc.input_ids).endswith("again<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


# ------------------------------------------------------------------------------------------- ChatML family


def test_smollm2_gguf_chatml(smollm_tok):
    r = ChatRenderer(smollm_tok)
    enc = r.encode([U, A])
    assert enc.input_ids == template_ids(smollm_tok, [U, A])
    text = smollm_tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # template default
    assert spans(smollm_tok, enc) == ["Paris.<|im_end|>"]
    check_span_ends(smollm_tok, enc)
    multi = ChatRenderer(smollm_tok).encode(MULTI[:2] + [MULTI[2], A])
    # ChatML keeps history turns verbatim (no think-block stripping)
    assert spans(smollm_tok, multi) == ["<think>\nhmm\n</think>\n\nhello<|im_end|>", "Paris.<|im_end|>"]


def test_system_prompt_option(smollm_tok, byte_tok):
    for tok in (smollm_tok, byte_tok):
        enc = ChatRenderer(tok, system_prompt="Be brief.").encode([U, A])
        text = tok.decode(enc.input_ids)
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
        assert spans(tok, enc) == ["Paris.<|im_end|>"]
        # a conversation with its own system turn keeps it
        own = ChatRenderer(tok, system_prompt="Be brief.").encode([{"role": "system", "content": "Own."}, U, A])
        assert "Be brief." not in tok.decode(own.input_ids)


def test_byte_tokenizer_chatml_mask_is_exact(byte_tok):
    msgs = [U, A, {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    enc = ChatRenderer(byte_tok).encode(msgs)
    assert spans(byte_tok, enc) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    assert sum(enc.loss_mask) == len(byte_tok("Paris.Rome.", add_special_tokens=False)["input_ids"]) + 2
    shown = show_mask(byte_tok, enc.input_ids, enc.loss_mask)
    assert "assistant\n\u27e6Paris.<|im_end|>\u27e7\n<|im_start|>user\nAnd of Italy?" in shown


def test_not_prefix_stable_template_is_refused(byte_tok):
    tok = copy.deepcopy(byte_tok)
    # the first line depends on how many turns follow: earlier turns render differently in longer prefixes
    tok.chat_template = ("turns={{ messages|length }}\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match="not prefix-stable"):
        ChatRenderer(tok).encode([U, A])


def test_template_without_end_of_turn_token(byte_tok):
    tok = copy.deepcopy(byte_tok)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TemplateError, match="stop_tokens"):
        ChatRenderer(tok).encode([U, A])
    with pytest.raises(TemplateError, match="not a single token"):
        ChatRenderer(tok, stop_tokens=["</nope>"])


def test_tokenizer_without_template(byte_tok):
    tok = copy.deepcopy(byte_tok)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        ChatRenderer(tok)
