"""Every `helip-train` setting with its default and one-line meaning, read from the config classes' source text.

Why the source text and not the imported classes: TrainConfig's sections live beside torch, gRPC and open_clip
code, and `helip-train --help` must answer before any of that is imported (several seconds on a small machine).
Why comments: a field's meaning is already written where the field is declared, and one place is easier to keep
true than two. A field's meaning is, in this order:

1. its trailing comment: `workers: int = 2  # DataLoader worker processes per rank`;
2. the comment block right above it (for a field that needs a paragraph);
3. its `name: meaning` entry in the class docstring (`a, b: meaning` covers both).

Only the first sentence is kept. tests/unit/test_cli_help.py imports the real classes and fails when a field has
no meaning here, so a new field without one is caught where it is added.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = (PACKAGE_DIR / "config.py", "TrainConfig")

# Comments that talk to tools, not to readers.
PRAGMA = re.compile(r"^(noqa|type:|pragma|fmt:|ruff:)", re.IGNORECASE)
# A sentence ends at a full stop followed by a capital: "e.g. \"ViT-B-32\"" does not end one.
SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]\"'])\.\s+(?=[A-Z])")
DOC_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s+(\S.*)$")


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, as in YAML and --set: "optim.lr"
    default: str  # the default as the source writes it: "5e-4", '"\t"', "None"
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


class ModuleSource:
    """One module's syntax tree and comments, for reading its dataclasses without importing it."""

    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text()
        self.tree = ast.parse(self.text, filename=str(path))
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

    def find_class(self, name: str) -> ast.ClassDef | None:
        return next((n for n in self.tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)

    def imported_from(self, name: str) -> Path | None:
        """The file of the helip module this one imports `name` from (`from helip.trainer.pairs.x import Name`),
        found without importing it (find_spec imports only the light parent packages)."""
        for node in self.tree.body:
            if isinstance(node, ast.ImportFrom) and any(a.name == name and a.asname is None for a in node.names):
                module = node.module or ""
                if node.level == 0 and module.startswith("helip."):
                    spec = importlib.util.find_spec(module)
                    return Path(spec.origin) if spec and spec.origin else None
                if node.level != 1:
                    return None
                return self.path.parent.joinpath(*module.split(".")).with_suffix(".py")
        return None

    def comment_of(self, node: ast.AnnAssign) -> str:
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


def default_factory_of(value: ast.expr | None) -> str | None:
    """ "X" for `field(default_factory=X)`, else None."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for keyword in value.keywords:
            if keyword.arg == "default_factory" and isinstance(keyword.value, ast.Name):
                return keyword.value.id
    return None


def read_section(source: ModuleSource, class_name: str, prefix: str) -> list[Section]:
    """The section of class `class_name` (and of any dataclass field nested in it), keys under `prefix`."""
    node = source.find_class(class_name)
    if node is None:
        path = source.imported_from(class_name)
        if path is None or not path.exists():
            raise LookupError(f"{source.path}: cannot find the source of {class_name}")
        return read_section(ModuleSource(path), class_name, prefix)
    doc = ast.get_docstring(node) or ""
    documented = docstring_entries(doc)
    settings: list[Setting] = []
    nested: list[Section] = []
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        name = statement.target.id
        kind = ast.get_source_segment(source.text, statement.annotation) or ""
        if name.startswith("_") or kind.startswith(("ClassVar", "typing.ClassVar")):
            continue
        key = f"{prefix}.{name}" if prefix else name
        factory = default_factory_of(statement.value)
        if factory and (source.find_class(factory) or source.imported_from(factory)):
            nested.extend(read_section(source, factory, key))
            continue
        default = ast.get_source_segment(source.text, statement.value) if statement.value else "required"
        meaning = source.comment_of(statement) or documented.get(name, "")
        settings.append(Setting(key, default or "", kind, first_sentence(meaning)))
    own = [Section(prefix, class_name, first_sentence(doc.split("\n\n")[0]), tuple(settings))] if settings else []
    return own + nested


@lru_cache(maxsize=1)
def sections() -> tuple[Section, ...]:
    """TrainConfig's sections in declaration order (data, model, loss, mining, optim, run)."""
    path, class_name = ROOT
    return tuple(read_section(ModuleSource(path), class_name, ""))


def settings() -> dict[str, Setting]:
    return {s.key: s for section in sections() for s in section.settings}
