"""The parity gate: export fails unless llama.cpp will serve exactly what was trained.

On a sample of real training conversations, with and without a system prompt, for every GGUF:
  1 token parity     transformers' ids of the rendered text == llama.cpp's ids with the GGUF's tokenizer
  2 one BOS          every runtime path (llama-cpp-python and llama-server rendering the template,
                     tunelab serve's template file, the Modelfile; templates/runtimes.py) feeds
                     training's ids, so exactly the BOS training had, never two, never none
  3 end of turn      the GGUF's EOS is the token the loss taught as the end of an assistant turn, an
                     end-of-generation token for llama.cpp, and it carried loss in training
  4 served template  llama-cpp-python rendering the GGUF's embedded template == the training template
                     (add_generation_prompt on and off)
Check 5 (answers stop on the end-of-turn token, no role names or special-token text) is measured by
evaluation: stop_by_eot_rate and artifact_free_rate, required in every eval config.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from tunelab.templates.chat import ChatTemplate, Message

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CHECKS = {1: "token parity", 2: "one BOS", 3: "end of turn", 4: "served template"}


class ParityError(RuntimeError):
    def __init__(self, gguf: Path, problems: List[str]):
        self.problems = problems
        super().__init__(f"the parity gate refused {gguf.name}: what llama.cpp would serve is not what was "
                         f"trained.\n" + "\n".join(problems))


@dataclass
class TrainingContract:
    """What training did, written by the train stage and checked by export (check 3 and 4)."""

    template_source: str
    end_of_turn: str
    eot_id: int
    bos: str
    bos_token: str
    eot_loss_tokens: int  # label positions equal to eot_id: the end of turn carried loss this often
    assistant_turns: int
    added_tokens: Dict[str, int] = field(default_factory=dict)
    # Label positions equal to eot_id that do not end an assistant turn: the model was taught to stop
    # inside an answer (special-token text trained as the control token). None: an older contract.
    eot_inside_answers: Optional[int] = None

    @classmethod
    def read(cls, path: Path) -> Optional["TrainingContract"]:
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False))

    def template(self) -> ChatTemplate:
        return ChatTemplate(self.template_source, self.end_of_turn, self.bos_token, self.end_of_turn, bos=self.bos,
                            origin="the template training used (train/template_contract.json)")


def training_contract(template: ChatTemplate, tokenizer, labels: List[List[int]], conversations,
                      added_tokens: Dict[str, int]) -> TrainingContract:
    eot_id = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    # Each assistant turn is one run of trained labels (its content, then its end of turn), so the
    # end of turn may only be the last label of a run; anywhere else it teaches stopping mid-answer.
    inside = sum(token == eot_id and k + 1 < len(row) and row[k + 1] != -100
                 for row in labels for k, token in enumerate(row))
    return TrainingContract(
        template_source=template.source, end_of_turn=template.end_of_turn, eot_id=eot_id, bos=template.bos,
        bos_token=template.bos_token, eot_loss_tokens=sum(row.count(eot_id) for row in labels),
        assistant_turns=sum(m["role"] == "assistant" for c in conversations for m in c), added_tokens=added_tokens,
        eot_inside_answers=inside)


def sample_conversations(conversations: List[List[Message]], count: int = 6) -> List[List[Message]]:
    """`count` real conversations, each once with a system prompt and once without."""
    samples = []
    for messages in conversations[:count]:
        without = [m for m in messages if m["role"] != "system"]
        system = next((m["content"] for m in messages if m["role"] == "system"), DEFAULT_SYSTEM_PROMPT)
        samples += [[{"role": "system", "content": system}] + without, without]
    return samples


class GGUFVocab:
    """The GGUF's own tokenizer and metadata, as llama.cpp (through llama-cpp-python) reads them."""

    def __init__(self, path: Path):
        import llama_cpp

        from tunelab.export.llama_cpp import quiet_llama

        self._lib = llama_cpp
        with quiet_llama(f"loading the vocabulary of {path}"):
            self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab
        self.bos_id, self.eos_id = self.llm.token_bos(), self.llm.token_eos()
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str, add_bos: bool = False) -> List[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def text(self, token_id: int) -> str:
        return self.llm._model.token_get_text(token_id) if token_id >= 0 else ""

    def is_end_of_generation(self, token_id: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token_id))

    def render(self, messages: List[Message], add_generation_prompt: bool) -> str:
        """The prompt llama-cpp-python's chat completion builds from the embedded template."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(template=self.chat_template, eos_token=self.text(self.eos_id),
                                        bos_token=self.text(self.bos_id), add_generation_prompt=add_generation_prompt)
        return formatter(messages=messages).prompt

    def close(self) -> None:
        self.llm.close()


def _first_difference(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def text_diff(expected: str, got: str, expected_name: str, got_name: str) -> str:
    i = _first_difference(expected, got)
    lo = max(0, i - 60)
    return (f"    first difference at character {i}:\n"
            f"    {expected_name:>12}: {expected[lo:i + 60]!r}\n    {got_name:>12}: {got[lo:i + 60]!r}")


def ids_diff(expected: List[int], got: List[int], expected_name: str, got_name: str, piece) -> str:
    i = _first_difference(expected, got)
    window = slice(max(0, i - 3), i + 5)

    def show(ids):
        return " ".join(f"{t}:{piece(t)!r}" for t in ids[window])

    return (f"    first difference at token {i} (lengths {len(expected)} vs {len(got)}):\n"
            f"    {expected_name:>12}: {show(expected)}\n    {got_name:>12}: {show(got)}")


def _texts(template: ChatTemplate, messages: List[Message]):
    yield template.render(messages), "whole conversation"
    yield template.render(messages[:-1], add_generation_prompt=True), "generation prompt"


def check_token_parity(vocab: GGUFVocab, template: ChatTemplate, tokenizer, samples) -> List[str]:
    for messages in samples:
        for text, what in _texts(template, messages):
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = vocab.tokenize(text)
            if ours != theirs:
                return [f"check 1 ({CHECKS[1]}) failed on a {what}: transformers and llama.cpp tokenize it "
                        f"differently\n" + ids_diff(ours, theirs, "transformers", "llama.cpp", vocab.text)]
    return []


def check_bos(vocab: GGUFVocab, template: ChatTemplate, tokenizer, samples, server=None,
              system_prompt: Optional[str] = None, served_source: Optional[str] = None) -> List[str]:
    """Check 2, per runtime path (templates/runtimes.py): each feeds training's ids, so exactly the
    BOS training had (one where template.bos=template) and not one more."""
    from tunelab.templates.runtimes import (MODES, first_mismatch, leading_bos, required_paths, served_template_ids,
                                            trained_ids)

    head = f"check 2 ({CHECKS[2]}) failed"
    if tokenizer.bos_token_id is not None and template.bos == "template" and vocab.bos_id != tokenizer.bos_token_id:
        return [f"{head}: the GGUF's BOS id {vocab.bos_id} is not the tokenizer's {tokenizer.bos_token_id}"]
    for messages in samples:
        trained = trained_ids(template, tokenizer)(messages, False)
        leading = leading_bos(trained, vocab.bos_id)
        # (a template.bos=none text may start with the BOS id as markup: SmolLM2's BOS is <|im_start|>)
        if leading > 1 or (template.bos == "template" and leading != 1):
            wanted = "exactly one" if template.bos == "template" else "at most one"
            return [f"{head}: template.bos={template.bos} wants {wanted} BOS; the template writes "
                    f"{leading_bos(trained, vocab.bos_id)} leading BOS, and training would learn them\n"
                    + ids_diff(trained, trained, "trained", "trained", vocab.text)]
    paths = required_paths(vocab, server, system_prompt)
    if served_source is not None:
        paths["tunelab serve's template file"] = (served_template_ids(vocab, served_source, template), system_prompt,
                                                  MODES)
    problems = []
    for name, (ids, system, modes) in paths.items():
        found = first_mismatch(ids, trained_ids(template, tokenizer), samples, system, modes)
        if found:
            what, expected, got = found
            problems.append(f"{head} for {name} on a {what}: training had {leading_bos(expected, vocab.bos_id)} "
                            f"leading BOS, it feeds {leading_bos(got, vocab.bos_id)} (GGUF add_bos_token="
                            f"{vocab.add_bos})\n" + ids_diff(expected, got, "trained", "served", vocab.text))
    return problems


def check_end_of_turn(vocab: GGUFVocab, template: ChatTemplate, tokenizer,
                      contract: Optional[TrainingContract]) -> List[str]:
    head = f"check 3 ({CHECKS[3]}) failed"
    eot_id = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    problems = []
    if vocab.eos_id != eot_id:
        problems.append(f"{head}: the GGUF's EOS is {vocab.eos_id} {vocab.text(vocab.eos_id)!r}, the end of "
                        f"turn is {eot_id} {template.end_of_turn!r}: generation would not stop where training taught")
    elif not vocab.is_end_of_generation(eot_id):
        problems.append(f"{head}: llama.cpp does not treat {template.end_of_turn!r} (id {eot_id}) as end of generation")
    if contract is None:
        return problems
    if (contract.end_of_turn, contract.eot_id) != (template.end_of_turn, eot_id):
        problems.append(f"{head}: training taught {contract.end_of_turn!r} (id {contract.eot_id}) as the end of "
                        f"turn, the export writes {template.end_of_turn!r} (id {eot_id})")
    if contract.eot_loss_tokens < max(contract.assistant_turns, 1):
        problems.append(f"{head}: the end-of-turn token {contract.end_of_turn!r} carried loss "
                        f"{contract.eot_loss_tokens} times for {contract.assistant_turns} assistant turns: its label "
                        "was masked, so the model never learned to stop")
    if contract.eot_inside_answers:
        problems.append(f"{head}: the end-of-turn token {contract.end_of_turn!r} carried loss "
                        f"{contract.eot_inside_answers} time(s) inside an assistant answer, not at its end: the "
                        "model was taught to stop inside an answer. Remove that text from the data or set "
                        "dataset.special_tokens_in_text=escape, then train again")
    return problems


def check_served_template(vocab: GGUFVocab, trained: ChatTemplate, exported: ChatTemplate, samples) -> List[str]:
    head = f"check 4 ({CHECKS[4]}) failed"
    if not vocab.chat_template:
        return [f"{head}: the GGUF carries no tokenizer.chat_template; a server would guess one"]
    if trained.source != exported.source:
        head += (f": the export's template (template={exported.name}) is not the one training used; "
                 "export with the training template or train again")
    for messages in samples:
        for prompt, add_generation_prompt in ((messages, False), (messages[:-1], True)):
            expected = trained.render(prompt, add_generation_prompt=add_generation_prompt)
            served = vocab.render(prompt, add_generation_prompt)
            if served != expected:
                return [f"{head} (add_generation_prompt={add_generation_prompt}): llama-cpp-python renders the "
                        "GGUF's template differently from the training template\n"
                        + text_diff(expected, served, "training", "GGUF")]
    return []


def run_gate(gguf: Path, template: ChatTemplate, tokenizer, conversations: List[List[Message]],
             contract: Optional[TrainingContract] = None, server_for=None, system_prompt: Optional[str] = None,
             served_source: Optional[str] = None) -> dict:
    """All four checks on one GGUF; raises ParityError listing every failed check.

    server_for(gguf): a context manager giving a running llama-server for it (None: not built);
    system_prompt: the default tunelab's servers add; served_source: the template file they serve."""
    from contextlib import nullcontext

    from tunelab.templates.runtimes import runtime_report

    samples = sample_conversations(conversations)
    trained = contract.template() if contract else template
    vocab = GGUFVocab(gguf)
    try:
        with (server_for(gguf) if server_for else nullcontext()) as server:
            problems = (check_token_parity(vocab, template, tokenizer, samples)
                        + check_bos(vocab, template, tokenizer, samples, server, system_prompt, served_source)
                        + check_end_of_turn(vocab, template, tokenizer, contract)
                        + check_served_template(vocab, trained, template, samples))
        runtimes = runtime_report(vocab, template, tokenizer, samples, system_prompt, server is not None)
    finally:
        vocab.close()
    if problems:
        raise ParityError(gguf, problems)
    return {"checks": [f"{n} {name}" for n, name in CHECKS.items()], "conversations": len(samples),
            "template_sha256": hashlib.sha256(template.source.encode()).hexdigest(),
            "trained_end_of_turn": contract is not None, "runtimes": runtimes}
