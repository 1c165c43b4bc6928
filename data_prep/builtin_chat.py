"""builtin-chat: conversations about the Python standard library, generated offline and deterministically.

`python -m data_prep --format chat --source builtin-chat --tokenizer-from data/builtin` makes the default
fine-tuning data from them, on a fresh machine, without downloads. Every public function, class and method of
the standard library's `.py` files (the modules of `--source builtin`; test packages left out) is read with
`ast` -- nothing is imported, so no module's side effects run -- and gives at most two conversations:

- knowledge (kinds "doc", "signature", "module"), about a function, class or method by name: what it does (the
  assistant answers with the first paragraph of its docstring), its signature, which module provides it
  (asked only of names defined once in the library); one to three of these in a conversation, the later ones
  as follow-ups ("And its signature?"); a method without a docstring is asked about only in context;
- in context (kinds "name", "parameters", "returns", "raises"), about a function or method whose code the user
  pastes (normalised by `ast.unparse`, docstring and decorators left out): its name, its parameters with their
  defaults (exactly the text between the parentheses of its `def` line), the names it returns (`return NAME`)
  and the exceptions it raises; one to three questions, the later ones as follow-ups. The answer is in the
  conversation itself, so a held-out evaluation of these measures a skill that carries over to code never
  seen in training, not a memorised docstring.

A quarter of the conversations open with a system prompt. Every choice (which questions, their wording, the
system prompt) comes from a random generator seeded by the definition's module and name, so the output
depends only on the standard library of the running interpreter.

Validation: whole modules are held out (`held_out`: about `VAL_PERCENT`% of them, chosen by a hash of the
module's name); their conversations form the validation split and the training split never shows them.

    for c in conversations("val"): c.messages, c.kinds       # kinds: one per assistant turn
    for messages, answer, kind in heldout_eval_items(): ...   # what launch/eval.py scores

`heldout_eval_items` is the held-out evaluation: see its docstring for the exact-match rule.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import random
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from data_prep.sources import CHAT_BUILTIN, BuiltinSource, Row

KNOWLEDGE_KINDS = ("doc", "signature", "module")
IN_CONTEXT_KINDS = ("name", "parameters", "returns", "raises")
"""Questions answered from the code pasted into the conversation."""
EVAL_KINDS = ("name", "parameters")
"""The in-context kinds `heldout_eval_items` yields by default: scored by exact match."""
VAL_PERCENT = 8
EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test"})
"""Path parts of modules left out: the test suites (thousands of undocumented test methods)."""
MAX_SOURCE_CHARS = 480
MAX_SOURCE_LINES = 14
MAX_DOC_CHARS = 320
MAX_SIGNATURE_CHARS = 160
SYSTEM_PROMPTS = (
    "You are a helpful assistant who knows the Python standard library.",
    "Answer briefly and precisely.",
    "You are a Python expert. Keep your answers short.",
    "You answer questions about Python code.",
)


@dataclass(frozen=True)
class Definition:
    """A public function, class or method of a standard-library module, as `ast` sees it."""

    module: str
    qualname: str  # "dumps", "JSONEncoder", "JSONEncoder.encode"
    kind: str  # "function" | "class" | "method"
    params: str | None  # the parameter list (a class: its __init__'s without self); None: unknown
    doc: str  # the docstring's first paragraph on one line; "" when none or too long
    source: str  # a function's code without docstring and decorators; "" for a class or a long function
    returns: tuple[str, ...] = ()  # names returned by `return NAME`, in order of appearance
    raises: tuple[str, ...] = ()  # exception classes raised, in order of appearance

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.qualname}"


@dataclass(frozen=True)
class Conversation:
    """One generated conversation: `kinds` names the question of each assistant turn, in order."""

    module: str
    split: str  # "train" | "val"
    messages: tuple[dict[str, str], ...]
    kinds: tuple[str, ...]

    @property
    def in_context(self) -> bool:
        """Whether the questions are about code pasted into the conversation."""
        return self.kinds[0] in IN_CONTEXT_KINDS


class EvalItem(NamedTuple):
    """A held-out question: the conversation up to it (ending with the user's turn), the expected reply, its kind."""

    messages: list[dict[str, str]]
    answer: str
    kind: str


# ------------------------------------------------------------------------------------------ reading code


def module_name(path: str) -> str | None:
    """"json/decoder.py" -> "json.decoder", "json/__init__.py" -> "json"; None for a test module or a path that
    is not an importable name."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or EXCLUDED_PARTS.intersection(parts) or not all(part.isidentifier() for part in parts):
        return None
    return ".".join(parts)


def held_out(module: str) -> bool:
    """Whether a module's conversations belong to the validation split (a hash of its name: stable everywhere)."""
    return int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) % 100 < VAL_PERCENT


def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line; "" when there is none or it is too short or long to answer with."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    return text if 12 <= len(text) <= MAX_DOC_CHARS else ""


def _own_nodes(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """The nodes of a function body in source order, without descending into nested functions or classes."""
    for node in nodes:
        yield node
        children = [child for child in ast.iter_child_nodes(node)
                    if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
        yield from _own_nodes(children)


def _returns_and_raises(function: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[tuple[str, ...], tuple[str, ...]]:
    returns: list[str] = []
    raises: list[str] = []
    for node in _own_nodes(function.body):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
            returns.append(node.value.id)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = ast.unparse(exc) if isinstance(exc, (ast.Name, ast.Attribute)) else ""
            if name[-1:].isalpha() and name.rsplit(".", 1)[-1][:1].isupper():  # a class, not a variable
                raises.append(name)
    return tuple(dict.fromkeys(returns)), tuple(dict.fromkeys(raises))


def _function(module: str, node: ast.FunctionDef | ast.AsyncFunctionDef, qualname: str, kind: str) -> Definition:
    doc = ast.get_docstring(node)
    body = node.body[1:] if doc is not None else node.body
    source = ""
    if body:
        bare = copy.copy(node)
        bare.body, bare.decorator_list = body, []
        text = ast.unparse(bare)
        if len(text) <= MAX_SOURCE_CHARS and text.count("\n") < MAX_SOURCE_LINES:
            source = text
    returns, raises = _returns_and_raises(node)
    return Definition(module, qualname, kind, ast.unparse(node.args), first_paragraph(doc), source, returns, raises)


def _class(module: str, node: ast.ClassDef) -> Definition:
    params = None
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            args = copy.deepcopy(item.args)
            (args.posonlyargs or args.args or [None]).pop(0)  # self
            params = ast.unparse(args)
    return Definition(module, node.name, "class", params, first_paragraph(ast.get_docstring(node)), "")


def _public(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_")


def module_definitions(module: str, tree: ast.Module) -> list[Definition]:
    """The public top-level functions and classes of a parsed module, each class followed by its public methods."""
    found = []
    for node in filter(_public, tree.body):
        if isinstance(node, ast.ClassDef):
            found.append(_class(module, node))
            found += [_function(module, item, f"{node.name}.{item.name}", "method")
                      for item in filter(_public, node.body) if not isinstance(item, ast.ClassDef)]
        else:
            found.append(_function(module, node, node.name, "function"))
    return found


@lru_cache(maxsize=2)
def library_definitions(source: BuiltinSource) -> tuple[tuple[str, tuple[Definition, ...]], ...]:
    """(module, its definitions) of every module of the built-in corpus, in its file order (parsed, not imported)."""
    modules = []
    for path in source.files:
        module = module_name(path)
        if module is None:
            continue
        try:
            tree = ast.parse((source.root / path).read_bytes(), filename=path)
        except (SyntaxError, ValueError, OSError):
            continue  # a few deliberately broken files
        modules.append((module, tuple(module_definitions(module, tree))))
    return tuple(modules)


# ------------------------------------------------------------------------------------------ conversations
# Wordings: the first question names its subject ({full}: module.qualname, {name}: the bare name) or shows the
# code ({code}); a follow-up refers back to it.
FIRST_QUESTIONS = {
    "doc": ("What does `{full}` do?", "Explain `{full}` in one sentence.", "What is `{full}` for?",
            "Describe `{full}`."),
    "signature": ("What is the signature of `{full}`?", "How do I call `{full}`?",
                  "What arguments does `{full}` take?"),
    "module": ("Which module provides `{name}`?", "Where is `{name}` defined?", "What do I import to get `{name}`?"),
    "name": ("What is the name of this function?", "What is this function called?",
             "Which function is defined here?"),
    "parameters": ("What parameters does this function take, with their defaults?",
                   "List the parameters of this function and their defaults.", "Which arguments does it accept?"),
    "returns": ("Which names does this function return?", "What variables can this function return?"),
    "raises": ("Which exceptions can this function raise?", "What does this function raise?"),
}
FOLLOW_UPS = {
    "doc": ("What does it do?", "And what is it for?"),
    "signature": ("What is its signature?", "And how do I call it?"),
    "module": ("Which module is it in?", "Where is it defined?"),
    "name": ("What is its name?", "And what is it called?"),
    "parameters": ("And its parameters?", "Which parameters does it take, with their defaults?"),
    "returns": ("Which names does it return?", "And what can it return?"),
    "raises": ("Which exceptions can it raise?", "And what does it raise?"),
}


def _answer(kind: str, d: Definition) -> str:
    """The assistant's reply to a question of `kind` about `d` (in-context replies are the bare fact)."""
    if kind == "doc":
        return d.doc
    if kind == "signature":
        return f"`{d.full_name}({d.params})`"
    if kind == "module":
        return f"`{d.qualname}` is defined in the `{d.module}` module."
    if kind == "name":
        return d.name
    if kind == "parameters":
        return str(d.params)
    return ", ".join(d.returns if kind == "returns" else d.raises)


def _available(d: Definition, unique: frozenset[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The knowledge kinds and the in-context kinds that can be asked about `d` (a method without a docstring is
    asked only about its code)."""
    knowledge = [kind for kind, ok in (
        ("doc", bool(d.doc)),
        ("signature", d.params is not None and len(d.params) + len(d.full_name) <= MAX_SIGNATURE_CHARS),
        ("module", d.kind != "method" and d.qualname in unique)) if ok] if d.doc or d.kind != "method" else []
    in_context = [kind for kind, ok in (("name", True), ("parameters", bool(d.params)), ("returns", bool(d.returns)),
                                        ("raises", bool(d.raises))) if ok] if d.source else []
    return tuple(knowledge), tuple(in_context)


def _turns(d: Definition, kinds: Iterable[str], rng: random.Random, code: str | None) -> list[dict[str, str]]:
    """The user/assistant turns asking `kinds` about `d`, the code pasted into the first question when given."""
    messages = []
    for number, kind in enumerate(kinds):
        if number:
            question = rng.choice(FOLLOW_UPS[kind])
        else:
            question = rng.choice(FIRST_QUESTIONS[kind]).format(full=d.full_name, name=d.qualname)
            if code is not None:
                block = f"```python\n{code}\n```"
                question = f"{question}\n\n{block}" if rng.random() < 0.5 else f"{block}\n\n{question}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": _answer(kind, d)}]
    return messages


def _pick(kinds: tuple[str, ...], rng: random.Random) -> list[str]:
    """One to three of `kinds` (one most often), in random order."""
    count = min(len(kinds), 1 if rng.random() < 0.55 else 2 if rng.random() < 0.75 else 3)
    return rng.sample(kinds, count)


def definition_conversations(d: Definition, unique: frozenset[str]) -> Iterator[tuple[list[dict[str, str]],
                                                                                      tuple[str, ...]]]:
    """(messages, kinds) of the conversations about `d`: one about what it is (when anything can be asked) and
    one about its pasted code (when it is a short function); deterministic for `d`."""
    rng = random.Random(f"{CHAT_BUILTIN} {d.full_name}")
    knowledge, in_context = _available(d, unique)
    for kinds, code in ((knowledge, None), (in_context, d.source)):
        if not kinds:
            continue
        chosen = _pick(kinds, rng)
        system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.25 else []
        yield system + _turns(d, chosen, rng, code), tuple(chosen)


def conversations(split: str | None = None, source: BuiltinSource | None = None) -> Iterator[Conversation]:
    """The built-in conversations in their fixed order (modules in file order, definitions in source order);
    only those of `split` ("train" or "val") when given."""
    modules = library_definitions(source or BuiltinSource.discover())
    counts = Counter(d.qualname for _, definitions in modules for d in definitions if d.kind != "method")
    unique = frozenset(name for name, count in counts.items() if count == 1)
    for module, definitions in modules:
        module_split = "val" if held_out(module) else "train"
        if split is not None and split != module_split:
            continue
        for d in definitions:
            for messages, kinds in definition_conversations(d, unique):
                yield Conversation(module, module_split, tuple(messages), kinds)


def heldout_eval_items(kinds: Iterable[str] = EVAL_KINDS, limit: int | None = None) -> Iterator[EvalItem]:
    """The held-out evaluation: one item per assistant turn of a validation conversation whose question is of one
    of `kinds` (default "name" and "parameters", the in-context questions), in validation-split order, at most
    `limit` items.

    `messages` is the conversation before that turn (system prompt, the pasted code, earlier questions with their
    reference answers), ending with the user's question: render it with
    `gpt_moe.data.chat_template.format_chat(tokenizer, messages)` (which appends `<|assistant|>`) and generate until
    `<|end|>`.
    `answer` is the reference reply: the reply is correct when its text, stripped of surrounding whitespace,
    equals `answer` exactly (a "name" answer is the bare name, e.g. `parse_args`; a "parameters" answer is the
    text between the parentheses of the pasted `def` line, e.g. `self, args=None, namespace=None`).
    """
    wanted = set(kinds)
    unknown = wanted - set(KNOWLEDGE_KINDS + IN_CONTEXT_KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; expected some of "
                         f"{', '.join(KNOWLEDGE_KINDS + IN_CONTEXT_KINDS)}")
    count = 0
    for conversation in conversations("val"):
        turns = [i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"]
        for index, kind in zip(turns, conversation.kinds):
            if kind in wanted:
                if limit is not None and count >= limit:
                    return
                yield EvalItem([dict(m) for m in conversation.messages[:index]],
                               conversation.messages[index]["content"], kind)
                count += 1


@dataclass(frozen=True)
class BuiltinChatSource:
    """`--source builtin-chat`: the conversations above as rows of the chat pipeline; the source decides the split."""

    source: BuiltinSource
    decides_split = True

    @classmethod
    def discover(cls) -> BuiltinChatSource:
        return cls(BuiltinSource.discover())

    @property
    def description(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        return (f"{CHAT_BUILTIN}: conversations about the Python {version} standard library (read with ast; "
                f"about {VAL_PERCENT}% of its modules held out)")

    @property
    def n_documents(self) -> int | None:
        return None

    def rows(self) -> Iterator[Row]:
        for number, c in enumerate(conversations(source=self.source)):
            yield Row(f"{CHAT_BUILTIN} #{number} ({c.module})", {"messages": list(c.messages)}, c.split)
