"""An Ollama Modelfile next to each GGUF, with the training template written out explicitly.

Ollama's TEMPLATE is a Go template, not Jinja. For templates that wrap each message on its own
(`prefix(role) + content + suffix(role)`, as ChatML, Llama 3, Phi-3, Zephyr and Alpaca do, also
with a default system prompt when there is none, as SmolLM2's own template does), the
pieces are read off the Jinja template by rendering sentinel messages, and the decomposition is
verified by token ids (templates/runtimes.py): reassembled, without the BOS when the GGUF adds it
(Ollama does, as the GGUF's add_bos_token says), real conversations give training's ids exactly.
Templates that merge turns (Mistral and Gemma fold the system prompt into the first user turn)
get no TEMPLATE line; the Modelfile says so instead of shipping a template that differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tunelab.templates.chat import ChatTemplate, Message

SENTINEL = "TUNELAB_SENTINEL_CONTENT"
ROLES = ("system", "user", "assistant")


@dataclass
class Pieces:
    head: str  # what the template writes before any message (a BOS)
    wraps: Dict[str, Tuple[str, str]]  # role -> (prefix, suffix) around its content
    generation: str  # what add_generation_prompt appends
    default_system: str  # the system turn's content the template adds when there is none ("" if it adds none)


def _after(template: ChatTemplate, context: List[Message], role: str) -> Optional[Tuple[str, str]]:
    before = template.render(context)
    text = template.render(context + [{"role": role, "content": SENTINEL}])
    if not text.startswith(before) or text.count(SENTINEL) != 1:
        return None
    prefix, suffix = text[len(before):].split(SENTINEL)
    return prefix, suffix


def message_pieces(template: ChatTemplate) -> Optional[Pieces]:
    """The template as pieces around each message, if it wraps messages one by one."""
    head = template.render([])
    system = _after(template, [], "system")
    context = [{"role": "system", "content": "S"}]
    wraps = {"system": system, "user": _after(template, context, "user"),
             "assistant": _after(template, context + [{"role": "user", "content": "U"}], "assistant")}
    if None in wraps.values() or not template.render([{"role": "system", "content": "S"}]).startswith(head):
        return None
    alone = template.render([{"role": "user", "content": SENTINEL}])
    added = alone[len(head):alone.find(wraps["user"][0] + SENTINEL)] if alone.startswith(head) else None
    if added is None or (added and not (added.startswith(system[0]) and added.endswith(system[1]))):
        return None
    default = added[len(system[0]):len(added) - len(system[1])] if added else ""
    probe = [{"role": "user", "content": SENTINEL}]
    generation = template.render(probe, add_generation_prompt=True)[len(alone):]
    return Pieces(head, wraps, generation, default)


def reassemble(pieces: Pieces, messages: List[Message], add_generation_prompt: bool, drop_head: bool = False) -> str:
    """What the Go template below renders, in Python, to verify it against the Jinja template
    (by token ids: templates/runtimes.py). drop_head: the GGUF adds the BOS, so the template must not."""
    if pieces.default_system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": pieces.default_system}] + messages
    body = "".join(pieces.wraps[m["role"]][0] + m["content"] + pieces.wraps[m["role"]][1] for m in messages)
    return ("" if drop_head else pieces.head) + body + (pieces.generation if add_generation_prompt else "")


def go_template(pieces: Pieces, drop_head: bool = False) -> str:
    system_pre, system_suf = pieces.wraps["system"]
    default = (f'{{{{ if and .Messages (ne (index .Messages 0).Role "system") }}}}'
               f"{system_pre}{pieces.default_system}{system_suf}{{{{ end }}}}") if pieces.default_system else ""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{suf}'
        for i, (role, (pre, suf)) in enumerate(pieces.wraps.items()))
    return (f"{'' if drop_head else pieces.head}{default}{{{{ range $i, $_ := .Messages }}}}"
            f"{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}{branches}{{{{ end }}}}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{pieces.generation}{{{{ end }}}}{{{{ end }}}}')


def _quoted(text: str) -> str:
    return '"""' + text + '"""'


def modelfile_text(gguf: Path, template: ChatTemplate, stops: List[str], pieces: Optional[Pieces], why: str,
                   drop_head: bool, system_prompt: Optional[str], settings: dict) -> str:
    """pieces: the Go template's, verified by token ids (templates/runtimes.py), or None and why not.
    Sampling is evaluation's (greedy, no repeat penalty: Ollama's defaults are 0.8 and 1.1)."""
    lines = [f"# Ollama Modelfile written by tunelab: `ollama create NAME -f {gguf.stem}.Modelfile`",
             f"FROM ./{gguf.name}"]
    go = go_template(pieces, drop_head) if pieces is not None else None
    if go is not None and '"""' not in go:
        lines.append(f"TEMPLATE {_quoted(go)}")
    else:
        lines.append(f"# No TEMPLATE: {why or 'the template holds three double quotes'}; use `tunelab serve`.")
    if system_prompt is not None and '"""' not in system_prompt:
        lines += ["# Training always had this system prompt: Ollama sends it when a request has none.",
                  f"SYSTEM {_quoted(system_prompt)}"]
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys([template.end_of_turn, *stops])]
    lines += ["# Evaluation's decoding: greedy, no repetition penalty, its context and answer length.",
              "PARAMETER temperature 0", "PARAMETER repeat_penalty 1", f"PARAMETER num_ctx {settings['n_ctx']}",
              f"PARAMETER num_predict {settings['max_tokens']}", "PARAMETER seed 0"]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf: Path, text: str) -> Path:
    path = gguf.with_suffix(".Modelfile")
    path.write_text(text)
    return path
