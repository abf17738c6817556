"""The token ids each runtime feeds the model for a conversation, against the ids training used.

A GGUF is served by more than one runtime, and each builds the prompt its own way:
  llama-cpp-python   renders the embedded Jinja template and adds no BOS of its own
  llama-server       renders the template it was given (--jinja), drops the rendered BOS when the
                     GGUF says add_bos_token, then tokenizes adding BOS as the GGUF says
  llama.cpp built-in a template of llama.cpp's own (`--no-jinja --chat-template NAME`); none
                     writes BOS, so the GGUF's add_bos_token decides
  Ollama Modelfile   the Go TEMPLATE tunelab writes (export/modelfile.py), BOS added as the GGUF says
Each path is compared with training by ids, on the gate's sample conversations (with and without a
system prompt; the whole conversation and its generation prompt), so one BOS too many or too few
anywhere is a difference. Built-in templates are only reported (equivalent or not), the others
must match.
"""
from __future__ import annotations

import ctypes
import json
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

from tunelab.export.modelfile import Pieces, message_pieces, reassemble
from tunelab.templates.chat import ChatTemplate, Message

Ids = List[int]
Render = Callable[[List[Message], bool], Ids]


def trained_ids(template: ChatTemplate, tokenizer) -> Render:
    return lambda messages, prompt: tokenizer(template.render(messages, add_generation_prompt=prompt),
                                              add_special_tokens=False)["input_ids"]


def llama_cpp_python_ids(vocab) -> Render:
    # Its Jinja chat handler marks the rendering as already holding the special tokens (added_special):
    # the text is tokenized with add_bos=False whatever the GGUF says.
    return lambda messages, prompt: vocab.tokenize(vocab.render(messages, prompt), add_bos=False)


def llama_server_ids(server) -> Render:
    return lambda messages, prompt: server.tokenize(server.apply_template(messages, prompt))


def builtin_names() -> List[str]:
    import llama_cpp

    count = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * count)()
    llama_cpp.llama_chat_builtin_templates(names, count)
    return sorted(n.decode() for n in names)


def builtin_render(name: str, messages: List[Message], add_generation_prompt: bool) -> Optional[str]:
    """llama.cpp's own rendering with its built-in template `name`; None if it refuses the messages."""
    import llama_cpp

    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * max(len(keep), 1))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
    size = 1024 + 4 * sum(len(c) for _, c in keep)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(keep), add_generation_prompt, buf, size)
        if n < 0:
            return None
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1
    return None


def builtin_ids(vocab, name: str) -> Render:
    def ids(messages, prompt):
        text = builtin_render(name, messages, prompt)
        return None if text is None else vocab.tokenize(text, add_bos=vocab.add_bos)
    return ids


def modelfile_ids(vocab, pieces: Pieces, system_prompt: Optional[str] = None) -> Render:
    """Ollama: its SYSTEM (the default system prompt) first when a request has none, the Go template,
    then BOS as the GGUF says."""
    drop_head = vocab.add_bos
    return lambda messages, prompt: vocab.tokenize(
        reassemble(pieces, with_system(messages, system_prompt), prompt, drop_head=drop_head), add_bos=vocab.add_bos)


def trained_system_prompt(conversations: List[List[Message]]) -> Optional[str]:
    """The system prompt to default to when every training conversation had one (the most common
    one if they differ); None when some had none (then a request without one is as trained)."""
    systems = [c[0]["content"] if c and c[0]["role"] == "system" else None for c in conversations]
    if not systems or None in systems:
        return None
    return Counter(systems).most_common(1)[0][0]


def with_system(messages: List[Message], system_prompt: Optional[str]) -> List[Message]:
    """What a server that supplies a default system prompt feeds for `messages`."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


MODES = ((False, "whole conversation"), (True, "generation prompt"))


def first_mismatch(path: Render, reference: Render, samples, system_prompt: Optional[str] = None,
                   modes=MODES) -> Optional[Tuple[str, Ids, Ids]]:
    """(what, expected ids, got ids) of the first sample where `path` differs from training; the
    path is given the sample as is, training the sample with the default system prompt added."""
    for messages in samples:
        for prompt, what in modes:
            shown = messages[:-1] if prompt else messages
            expected, got = reference(with_system(shown, system_prompt), prompt), path(shown, prompt)
            if got != expected:
                return what, expected, got or []
    return None


def leading_bos(ids: Ids, bos_id: int) -> int:
    return next((i for i, t in enumerate(ids) if t != bos_id), len(ids))


def builtin_equivalence(vocab, reference: Render, samples, namesake: str = "") -> dict:
    """Which of llama.cpp's built-in templates feed exactly the training ids (tested on `samples`)."""
    equivalent, differ = [], {}
    for name in builtin_names():
        found = first_mismatch(builtin_ids(vocab, name), reference, samples)
        if found is None:
            equivalent.append(name)
            continue
        what, expected, got = found
        at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        differ[name] = ("refuses the messages" if not got else
                        f"{what}: token {at} is {vocab.text(got[at]) if at < len(got) else 'missing'!r}, "
                        f"training has {vocab.text(expected[at]) if at < len(expected) else 'nothing'!r}")
    return {"builtin_equivalent": equivalent, "builtin_differ": differ,
            "namesake": namesake if namesake in differ or namesake in equivalent else None}


def modelfile_template(vocab, template: ChatTemplate, reference: Render, samples,
                       system_prompt: Optional[str]) -> Tuple[Optional[Pieces], str]:
    """The Go template's pieces if the Modelfile path gives the training ids, else (None, why)."""
    pieces = message_pieces(template)
    if pieces is None:
        return None, (f"template={template.name or 'custom'} does not wrap each message in one prefix and suffix "
                      "(it merges turns), so a Go template would differ")
    found = first_mismatch(modelfile_ids(vocab, pieces, system_prompt), reference, samples, system_prompt)
    if found is not None:
        return None, f"a Go template of it feeds other token ids than training on a {found[0]}"
    return pieces, ""


def required_paths(vocab, server=None, system_prompt: Optional[str] = None) -> Dict[str, tuple]:
    """The paths that must give the training ids: name -> (ids, default system prompt it adds, modes).
    llama-server only ever builds generation prompts: a final assistant message in a request is a
    prefill (rendered without its end of turn), so a whole conversation is not a request it serves."""
    paths = {"llama-cpp-python (embedded template)": (llama_cpp_python_ids(vocab), None, MODES)}
    if server is not None:
        paths["llama-server --jinja (the served template)"] = (llama_server_ids(server), system_prompt, MODES[1:])
    return paths


def served_template_ids(vocab, source: str, template: ChatTemplate) -> Render:
    """tunelab serve's template file, rendered as llama-cpp-python renders a Jinja template."""
    served = ChatTemplate(source, template.end_of_turn, template.bos_token, template.eos_token,
                          origin="tunelab serve's chat template file")
    return lambda messages, prompt: vocab.tokenize(served.render(messages, add_generation_prompt=prompt), add_bos=False)


def default_system_template(source: str, system_prompt: Optional[str]) -> str:
    """The trained template, plus: a conversation without a system prompt gets `system_prompt` first
    (what training always had). Written for Jinja2 and llama.cpp's Jinja engine alike."""
    if system_prompt is None:
        return source

    literal = json.dumps(system_prompt, ensure_ascii=False)
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}\n"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}\n"
            "{%- endif -%}\n" + source)


def runtime_report(vocab, template: ChatTemplate, tokenizer, samples, system_prompt: Optional[str],
                   server_checked: bool) -> dict:
    """What the export writes beside each GGUF: the checked paths, the built-ins, the Modelfile."""
    reference = trained_ids(template, tokenizer)
    report = builtin_equivalence(vocab, reference, samples, template.name)
    pieces, why = modelfile_template(vocab, template, reference, samples, system_prompt)
    report.update(add_bos_token=vocab.add_bos, conversations=len(samples), llama_server_checked=server_checked,
                  modelfile_template=pieces is not None, modelfile_why=why,
                  modelfile_pieces=None if pieces is None else {"head": pieces.head, "wraps": pieces.wraps,
                                                                "generation": pieces.generation,
                                                                "default_system": pieces.default_system})
    return report
