"""Jinja's immutable sandbox with bounds on work: time and size per render.

The sandbox stops code execution (no `__class__`, no mutation), not runaway work: nested loops,
`'x' * 10**9` or a macro calling itself render for as long as they like. Every render of a chat
template in tunelab (training text, prepare's lengths, the parity gate, export's Modelfile
samples, evaluation's prompts) goes through `render_bounded`, which stops one that exceeds
RENDER_SECONDS or RENDER_CHARS:
- time: without a loop or a call, template code runs once per line; so the deadline is checked
  on every iteration of every `for` (each loop's iterable is wrapped, in the parsed template) and
  on every call (macros, methods, globals all go through the sandbox's `call`);
- size: `*` and `**` are intercepted (which also keeps Jinja from folding them at compile time)
  and refused before they would make too large a value; the results of `+`, `~` and calls are
  measured; the output is counted chunk by chunk as the template yields it. A recursive macro
  ends at Python's recursion limit.
Checking at these points, not per line (a trace function), keeps rendering nearly as cheap as in
the plain sandbox (benchmarks/template_bounds.py) and leaves debuggers and coverage alone.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Optional

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

RENDER_SECONDS = 2.0  # per render: a chat template renders one conversation in well under 1 ms
RENDER_CHARS = 1_000_000  # of rendered text, and of any one value a template computes


class TemplateError(ValueError):
    pass


class TemplateLimitError(ValueError):
    """A template broke the sandbox or a bound. Not a TemplateError on purpose: the callers that
    collect TemplateErrors row by row (prepare's lengths, training's tokenization) must not catch
    it, the template itself is at fault, and each row would spend the time bound again."""


class _Exceeded(Exception):
    """Raised inside the template's frames; render_bounded turns it into a TemplateLimitError."""


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_size(value, what: str):
    if _size(value) > RENDER_CHARS:
        raise _Exceeded(f"{what} makes a value of {_size(value):,} items, over the bound of {RENDER_CHARS:,}")
    return value


class _Deadline(threading.local):
    """The deadline of the render running in this thread (None outside render_bounded)."""

    at: Optional[float] = None
    seconds: float = RENDER_SECONDS

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise _Exceeded(f"rendering took longer than the bound of {self.seconds:g} s")


_DEADLINE = _Deadline()


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with the results of `+` and `~` measured. Their operands are
    bounded, so measuring after is safe; in a chain `a + b + c` only the whole is measured (its
    parts are at most as long as the chain times the bound)."""

    _in_add = False

    def visit_Add(self, node, frame) -> None:
        if self._in_add:
            return super().visit_Add(node, frame)
        self._in_add = True
        self.write("environment.bounded(")
        try:
            super().visit_Add(node, frame)
        finally:
            self._in_add = False
        self.write(")")

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.bounded(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])
    code_generator_class = _BoundedCodeGenerator

    def _parse(self, source, name, filename):
        """The parsed template, every `for` iterating through loop_guard."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("loop_guard"), [loop.iter], [], None, None,
                                   lineno=loop.iter.lineno)
        return tree

    @staticmethod
    def loop_guard(iterable):
        for item in iterable:
            _DEADLINE.check()
            yield item

    @staticmethod
    def bounded(value):
        return _check_size(value, "'+' or '~'")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if _size(seq) and isinstance(times, int) and _size(seq) * times > RENDER_CHARS:
                    raise _Exceeded(f"'*' would make {_size(seq) * times:,} items, over the bound of {RENDER_CHARS:,}")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > 8 * RENDER_CHARS:
                raise _Exceeded(f"{left} ** {right} would be a number of over {RENDER_CHARS:,} bytes")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        _DEADLINE.check()
        result = super().call(__context, __obj, *args, **kwargs)
        return _check_size(result, f"calling {getattr(__obj, '__name__', 'a function')}")


def sandbox() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    return env


def render_bounded(compiled: jinja2.Template, origin: str, **context) -> str:
    """The rendered text, or TemplateLimitError naming `origin` (where the template came from) and
    which bound it broke (time, size, recursion, memory) or that it tried to break the sandbox."""
    outer = _DEADLINE.at, _DEADLINE.seconds  # a render inside a render keeps the outer deadline
    _DEADLINE.seconds = RENDER_SECONDS
    if outer[0] is None:
        _DEADLINE.at = time.monotonic() + RENDER_SECONDS
    chunks, total = [], 0
    try:
        for chunk in compiled.generate(**context):
            total += len(chunk)
            if total > RENDER_CHARS:
                raise _Exceeded(f"the rendered text is over the bound of {RENDER_CHARS:,} characters")
            chunks.append(chunk)
    except _Exceeded as err:
        raise TemplateLimitError(f"{origin}: {err}") from None
    except SecurityError as err:
        raise TemplateLimitError(f"{origin}: the template tried to break out of the sandbox ({err})") from None
    except RecursionError:
        raise TemplateLimitError(f"{origin}: the template recurses too deep (a macro calling itself?)") from None
    except MemoryError:
        raise TemplateLimitError(f"{origin}: the template ran out of memory") from None
    finally:
        _DEADLINE.at, _DEADLINE.seconds = outer
    return "".join(chunks)


def compile_bounded(env: BoundedSandbox, source: str, origin: str) -> jinja2.Template:
    """Compiled, with a template that Jinja's parser refuses or that breaks a bound while Jinja
    folds its constants named by origin."""
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"{origin}: not a valid Jinja template (line {err.lineno}: {err.message})") from None
    except _Exceeded as err:
        raise TemplateLimitError(f"{origin}: {err}") from None
    except MemoryError:  # Jinja folds constant filter calls while compiling: 'x'|center(10**12)
        raise TemplateLimitError(f"{origin}: the template ran out of memory while compiling") from None
