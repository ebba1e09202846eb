"""Every setting of a dataclass config with its default and one-line meaning, read from the classes themselves,
and the command-line flags made from them.

Both CLIs build their flags here: `helip-miner` from MinerConfig, `helip-train` from TrainConfig. Their config
classes live in import-light modules, so `--help` imports them and reads their fields, types and defaults with
`dataclasses.fields`. A field's meaning is written once, where the field is declared, as a comment; the class's own
source (`inspect.getsource`) gives it, in this order:

1. its trailing comment: `workers: int = 2  # DataLoader worker processes per rank`;
2. the comment block right above it (for a field that needs a paragraph);
3. its `name: meaning` entry in the class docstring (`a, b: meaning` covers both).

Only the first sentence is kept. Each CLI's help test fails when a field has no meaning, so a new field without one
is caught where it is added.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Comments that talk to tools, not to readers.
PRAGMA = re.compile(r"^(noqa|type:|pragma|fmt:|ruff:)", re.IGNORECASE)
# A sentence ends at a full stop followed by a capital: "e.g. \"ViT-B-32\"" does not end one.
SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]\"'])\.\s+(?=[A-Z])")
DOC_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s+(\S.*)$")


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, as in YAML and --set: "optim.lr"
    default: str  # the default's repr: "0.0005", "'\\t'", "None"
    kind: str  # the annotation as the source writes it: "int", "str | None"
    help: str  # one line; "" when the source says nothing about the field


@dataclass(frozen=True)
class Section:
    key: str  # "optim"
    class_name: str  # "OptimConfig"
    help: str  # the first sentence of the class docstring, or ""
    settings: tuple[Setting, ...]


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return SENTENCE_END.split(text, maxsplit=1)[0].strip().removesuffix(".")


class ClassSource:
    """One class's syntax tree and comments (from its source file), for the meanings of its fields."""

    def __init__(self, cls: type):
        self.text = textwrap.dedent(inspect.getsource(cls))
        self.node = next(n for n in ast.parse(self.text).body if isinstance(n, ast.ClassDef))
        self.lines = self.text.splitlines()
        self.trailing: dict[int, str] = {}  # line -> comment after code on that line
        self.own_line: dict[int, str] = {}  # line -> comment alone on its line
        for token in tokenize.generate_tokens(io.StringIO(self.text).readline):
            if token.type != tokenize.COMMENT:
                continue
            row, col = token.start
            comment = token.string.lstrip("#").strip()
            if PRAGMA.match(comment):
                continue
            (self.own_line if not self.lines[row - 1][:col].strip() else self.trailing)[row] = comment
        self.docstring = ast.get_docstring(self.node) or ""
        self.fields = {
            n.target.id: n for n in self.node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        }

    def comment_of(self, name: str) -> str:
        node = self.fields.get(name)
        if node is None:
            return ""
        trailing = [
            self.trailing[r] for r in range(node.lineno, (node.end_lineno or node.lineno) + 1) if r in self.trailing
        ]
        if trailing:
            return " ".join(trailing)
        above, row = [], node.lineno - 1
        while row in self.own_line:
            above.insert(0, self.own_line[row])
            row -= 1
        return " ".join(above)


def docstring_entries(doc: str) -> dict[str, str]:
    """{"name": "meaning ..."} from a docstring's `name: meaning` lines (continued by deeper-indented lines)."""
    entries: dict[str, str] = {}
    names: list[str] = []
    indent = -1
    for line in doc.splitlines():
        match = DOC_ENTRY.match(line)
        if match and (not names or len(match.group(1)) <= indent):
            indent = len(match.group(1))
            names = [n.strip() for n in match.group(2).split(",")]
            for name in names:
                entries[name] = match.group(3)
        elif names and line.strip() and len(line) - len(line.lstrip()) > indent:
            for name in names:
                entries[name] += " " + line.strip()
        else:
            names = []
    return entries


def read_section(cls: type, prefix: str) -> list[Section]:
    """The section of dataclass `cls` (and of any dataclass field nested in it), keys under `prefix`."""
    source = ClassSource(cls)
    documented = docstring_entries(source.docstring)
    settings: list[Setting] = []
    nested: list[Section] = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}" if prefix else field.name
        factory = field.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            nested.extend(read_section(factory, key))
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif factory is not dataclasses.MISSING:
            default = repr(factory())
        else:
            default = "required"
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        meaning = source.comment_of(field.name) or documented.get(field.name, "")
        settings.append(Setting(key, default, kind, first_sentence(meaning)))
    summary = first_sentence(source.docstring.split("\n\n")[0])
    own = [Section(prefix, cls.__name__, summary, tuple(settings))] if settings else []
    return own + nested


METAVARS = {"int": "INT", "float": "FLOAT", "bool": "BOOL"}


def add_setting_flags(
    parser: argparse.ArgumentParser, sections: Iterable[Section], aliases: Mapping[str, tuple[str, ...]]
) -> None:
    """One `--section.field VALUE` flag per setting (plus its `aliases`), grouped by section, each with its
    default and meaning. Values stay text: `settings.coerce` reads them strictly against the field's type, naming
    the key, so one reader serves files, environment and flags. A bool flag alone means true, as `--follow` or
    open_clip's switches do."""
    for section in sections:
        title = f"{section.key} ({section.class_name})" if section.key else section.class_name
        group = parser.add_argument_group(title, section.help or None)
        for setting in section.settings:
            options = {"metavar": METAVARS.get(setting.kind, "TEXT")}
            if setting.kind == "bool":
                options.update(nargs="?", const="true")
            # A top-level field (no section) is spelt with dashes only: --metrics-port, not --metrics_port.
            own = [f"--{setting.key}"] if "." in setting.key else []
            group.add_argument(
                *own,
                *aliases.get(setting.key, ()),
                dest=setting.key,
                help=f"{setting.help.replace('%', '%%')} (default: {setting.default.replace('%', '%%')})".lstrip(),
                **options,
            )


def given_settings(args: argparse.Namespace, sections: Iterable[Section]) -> dict[str, object]:
    """The dotted settings the command line gave (flags not given are None: the file's or default value stays)."""
    return {s.key: getattr(args, s.key) for section in sections for s in section.settings}
