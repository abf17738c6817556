"""The independent side of the evaluation checks: reference-answer log-probabilities computed with
plain llama-cpp-python (logits_all) on prompts rendered by transformers, not by tunelab."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def answer_logprobs(path: Path, tokenizer, conversations):
    """Per conversation: the last answer's tokens (through <|im_end|>) and the log-softmax of the
    logits that predict them."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        assert full.startswith(prompt)
        tokens = llm.tokenize(full.encode(), add_bos=False, special=True)
        start = len(llm.tokenize(prompt.encode(), add_bos=False, special=True))
        end = tokens.index(eot, start) + 1
        llm.reset()
        llm.eval(tokens[:end])
        logits = np.asarray(llm.scores[start - 1:end - 1], dtype=np.float64)
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        out.append((tokens[start:end], logp))
    return out
