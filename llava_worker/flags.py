"""WorkerConfig's fields as command-line flags: their argparse arguments and the README's table of them."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal

from llava_worker.config import WorkerConfig

_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag, derived from one WorkerConfig field."""

    name: str
    """The WorkerConfig field, also the argparse `dest`."""
    default: Any
    help: str
    """The field's attribute docstring on one line."""
    argparse_kwargs: dict[str, Any]
    """`type`, `choices`, `default` or `action` for `add_argument`."""

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@cache
def config_flags() -> tuple[Flag, ...]:
    """A flag for every WorkerConfig field, in field order."""
    hints = typing.get_type_hints(WorkerConfig)
    docs = attribute_docs(WorkerConfig)
    return tuple(_flag(field, hints[field.name], docs) for field in dataclasses.fields(WorkerConfig))


def attribute_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of `cls` (a string literal right under an annotated field), on one line each.

    Python keeps no such docstrings at runtime, so they are read from the class's source.
    """
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(node, ast.ClassDef)
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(node.body):
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            doc = _string_literal(following)
            if doc is not None:
                docs[statement.target.id] = " ".join(doc.split())
    return docs


def _string_literal(statement: ast.stmt) -> str | None:
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        value = statement.value.value
        return value if isinstance(value, str) else None
    return None


def _flag(field: dataclasses.Field[Any], hint: Any, docs: dict[str, str]) -> Flag:
    if field.name not in docs:
        raise TypeError(f"WorkerConfig.{field.name} needs a docstring: it is the flag's help")
    if field.default is dataclasses.MISSING:
        raise TypeError(f"WorkerConfig.{field.name} needs a plain default: it is the flag's default")
    kwargs = _argparse_kwargs(field.name, field.default, _without_none(hint))
    return Flag(field.name, field.default, docs[field.name], kwargs)


def _without_none(hint: Any) -> Any:
    """`X | None` → X; a hint that is no union stays as it is."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if len(rest) != 1:
        raise TypeError(f"no flag can take {hint!r}: only `X | None` unions are supported")
    return rest[0]


def _argparse_kwargs(name: str, default: Any, hint: Any) -> dict[str, Any]:
    if hint is bool:
        # A store_true flag can only switch a setting on.
        if default is not False:
            raise TypeError(f"WorkerConfig.{name}: a bool field must default to False to be a flag")
        return {"action": "store_true"}
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return {"type": type(choices[0]), "choices": choices, "default": default}
    if hint in (int, float, str):
        return {"type": hint, "default": default}
    raise TypeError(f"WorkerConfig.{name}: no flag can take the type {hint!r}")


def flags_table() -> str:
    """The README's table of flags, in Markdown: `python scripts/flags_table.py` prints it."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    rows += [f"| `{flag.option}` | {_markdown_default(flag)} | {_markdown_meaning(flag)} |" for flag in config_flags()]
    return "\n".join(rows)


def _markdown_default(flag: Flag) -> str:
    if flag.default is False:
        return "off"
    if flag.default is None:
        return "none"
    text = f"`{flag.default}`"
    if flag.name.endswith("_bytes") and flag.default % _MIB == 0:
        text += f" ({flag.default // _MIB} MiB)"
    return text


def _markdown_meaning(flag: Flag) -> str:
    meaning = flag.help
    choices = flag.argparse_kwargs.get("choices")
    if choices:
        meaning += " One of " + ", ".join(f"`{choice}`" for choice in choices) + "."
    # A bare pipe would end the table cell.
    return meaning.replace("|", "\\|")
