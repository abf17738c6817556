"""An Ollama Modelfile next to each GGUF, with the training template written out explicitly.

Ollama's TEMPLATE is a Go template, not Jinja. For templates that wrap each message on its own
(`prefix(role) + content + suffix(role)`, as ChatML, Llama 3, Phi-3, Zephyr and Alpaca do, also
with a default system prompt when there is none, as SmolLM2's own template does), the
pieces are read off the Jinja template by rendering sentinel messages, and the decomposition is
verified: reassembling the pieces must give the Jinja rendering of real conversations exactly.
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


def reassemble(pieces: Pieces, messages: List[Message], add_generation_prompt: bool) -> str:
    """What the Go template below renders, in Python, to verify it against the Jinja template."""
    if pieces.default_system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": pieces.default_system}] + messages
    body = "".join(pieces.wraps[m["role"]][0] + m["content"] + pieces.wraps[m["role"]][1] for m in messages)
    return pieces.head + body + (pieces.generation if add_generation_prompt else "")


def go_template(pieces: Pieces) -> str:
    system_pre, system_suf = pieces.wraps["system"]
    default = (f'{{{{ if and .Messages (ne (index .Messages 0).Role "system") }}}}'
               f"{system_pre}{pieces.default_system}{system_suf}{{{{ end }}}}") if pieces.default_system else ""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{suf}'
        for i, (role, (pre, suf)) in enumerate(pieces.wraps.items()))
    return (f"{pieces.head}{default}{{{{ range $i, $_ := .Messages }}}}"
            f"{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}{branches}{{{{ end }}}}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{pieces.generation}{{{{ end }}}}{{{{ end }}}}')


def modelfile_text(gguf: Path, template: ChatTemplate, stops: List[str], samples: List[List[Message]]) -> str:
    lines = [f"# Ollama Modelfile written by tunelab: `ollama create NAME -f {gguf.stem}.Modelfile`",
             f"FROM ./{gguf.name}"]
    found = message_pieces(template)
    exact = found is not None and all(
        reassemble(found, m, False) == template.render(m)
        and reassemble(found, m[:-1], True) == template.render(m[:-1], add_generation_prompt=True)
        for m in samples)
    if exact and '"""' not in go_template(found):
        lines.append(f'TEMPLATE """{go_template(found)}"""')
    else:
        lines.append(f"# No TEMPLATE: template={template.name} is not one prefix and suffix per message (it merges "
                     "turns), so a Go template would differ; use `tunelab serve`.")
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys([template.end_of_turn, *stops])]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf: Path, template: ChatTemplate, stops: List[str], samples: List[List[Message]]) -> Path:
    path = gguf.with_suffix(".Modelfile")
    path.write_text(modelfile_text(gguf, template, stops, samples))
    return path
