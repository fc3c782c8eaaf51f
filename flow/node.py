"""Nodes: plain functions with a decorator.

A node is a pure function of arrays and parameters.  Its positional
arguments are its *inputs* (wired to other steps by the graph); its
keyword-only arguments are its *parameters*, whose defaults make a frozen,
serializable config (``node.Params``)::

    @node(version=1)
    def normalized(image: np.ndarray, *, size: int = 64) -> np.ndarray:
        ...

There are two kinds:

* ``kind="item"`` (the default): one output per input item.  The framework
  calls it once per item (or, with ``batched=True``, once per batch with a
  list per item input, expecting a list back), many items per Dask task.
* ``kind="set"``: one output from many items (fitting a vocabulary, building
  an index).  An input wired to a per-item step arrives as :class:`Items`.

What a node returns is stored: a numpy array, a :class:`Blob` (opaque bytes,
e.g. an index file), or a flat ``dict`` of those plus small JSON-able values
(str, int, float, bool, None and tuples of them).

Identity
--------
A node's key prefix covers its ``name``, its declared ``version``, the
fingerprint of its normalized code and its parameters.  The fingerprint is a
hash of the function's syntax tree -- comments, docstrings, formatting, type
annotations and the decorator line don't count -- together with, found by
name in the function's body and recursively:

* functions and classes defined in the node's own top-level package
  (``nodes._helpers.smooth``, an ``nn.Module`` subclass);
* module-level constants of keyable types (``_WHITELIST = ("Modality", ...)``).

What the fingerprint does **not** see: code in other packages (numpy,
scikit-image, torch -- their versions are recorded in every recipe but are not
part of the key), functions reached other than by name (``getattr``, tables
of functions, methods of objects passed in), and anything read at run time
outside the inputs (which a pure node must not do).  When such a change alters
a node's output, bump ``version=``.

Parsing sources takes a few tenths of a second per command, so fingerprints are
remembered on disk (``$XDG_CACHE_HOME/flow/fingerprints``, or the folder in
``FLOW_FINGERPRINT_CACHE``; ``0`` turns it off) under a key of everything they
depend on: the contents of every loaded module file of the package, the values
of their module-level constants, and this file.  Closures are never cached.

Execution hints (``batch_size``, ``batched``) stay out of the key: they never
change the bytes a node produces.  So do statements that only report progress
(``progress(epoch + 1, epochs, loss=...)``, :mod:`flow.reporting`): a node may
add them without changing its key.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import os
import sys
import textwrap
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flow.keys import Key, key
from flow.reporting import progress
from flow.values import Blob

__all__ = ["Blob", "Items", "Node", "fingerprint", "node"]


# --------------------------------------------------------------------------
# values nodes exchange


class Items(Sequence):
    """The values of a per-item step, as a set node sees them.

    ``ids`` are the items' stable identifiers (source-relative paths), ``keys``
    their content keys, ``values`` the stored outputs, all in the same order
    (sorted by id, so a set node sees the same order in every build).
    """

    __slots__ = ("ids", "keys", "values")

    def __init__(self, ids: Sequence[str], keys: Sequence[Key], values: Sequence[Any]):
        if not (len(ids) == len(keys) == len(values)):
            raise ValueError("ids, keys and values must have the same length")
        self.ids = tuple(ids)
        self.keys = tuple(keys)
        self.values = list(values)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        return self.values[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values)

    def stack(self, field: str | None = None) -> np.ndarray:
        """The values (or one field of dict values) stacked into one array."""
        vals = self.values if field is None else [v[field] for v in self.values]
        return np.stack([np.asarray(v) for v in vals]) if vals else np.empty((0,))

    def __repr__(self) -> str:
        return f"Items(n={len(self)})"


# --------------------------------------------------------------------------
# code fingerprints

_SKIP_FIELDS = frozenset({"ctx", "type_comment", "kind", "lineno", "col_offset"})


def _strip(tree: ast.AST, *, top: bool) -> ast.AST:
    """Drop what doesn't change behaviour: docstrings, annotations, decorators."""
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = n.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                n.body = body[1:] or [ast.Pass()]
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
            n.returns = None
        if isinstance(n, ast.arg):
            n.annotation = None
        for field_name in ("body", "orelse", "finalbody", "handlers"):
            stmts = getattr(n, field_name, None)
            if isinstance(stmts, list):
                setattr(n, field_name, [_unannotated(x) for x in stmts])
    if top and isinstance(tree, ast.Module) and tree.body:
        first = tree.body[0]
        if isinstance(first, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            first.decorator_list = []
            if not isinstance(first, ast.ClassDef):
                first.name = "_"
    return tree


def _without_reports(tree: ast.AST, namespace: dict) -> ast.AST:
    """Drop the statements that only call :func:`flow.progress` (found by name in the
    module, or as ``flow.progress``): a report cannot change what a node returns."""

    def is_report(stmt: Any) -> bool:
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            return False
        f = stmt.value.func
        if isinstance(f, ast.Name):
            return namespace.get(f.id) is progress
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            mod = namespace.get(f.value.id)
            return isinstance(mod, types.ModuleType) and getattr(mod, f.attr, None) is progress
        return False

    for n in ast.walk(tree):
        for field_name in ("body", "orelse", "finalbody"):
            stmts = getattr(n, field_name, None)
            if isinstance(stmts, list) and any(is_report(x) for x in stmts):
                kept = [x for x in stmts if not is_report(x)]
                setattr(n, field_name, kept or ([ast.Pass()] if field_name == "body" else []))
    return tree


def _unannotated(stmt: Any) -> Any:
    """``y: float = v`` -> ``y = v``; a bare ``y: float`` -> ``pass``."""
    if not isinstance(stmt, ast.AnnAssign):
        return stmt
    if stmt.value is None:
        return ast.Pass()
    return ast.Assign(targets=[stmt.target], value=stmt.value)


def _dump(n: Any, out: list[str]) -> None:
    """A stable dump of a syntax tree: empty and default fields are left out,
    so a Python release that adds an optional field doesn't change it."""
    if isinstance(n, ast.AST):
        out.append(type(n).__name__)
        out.append("(")
        for name, value in ast.iter_fields(n):
            if name in _SKIP_FIELDS or value is None or value == []:
                continue
            out.append(name)
            out.append("=")
            _dump(value, out)
            out.append(",")
        out.append(")")
    elif isinstance(n, list):
        out.append("[")
        for v in n:
            _dump(v, out)
            out.append(",")
        out.append("]")
    else:
        out.append(repr(n))


# (function or class, top) -> (its normalized dump, what it references): a helper
# reached from many nodes is parsed once per process
_CODE: dict[bool, weakref.WeakKeyDictionary] = {
    True: weakref.WeakKeyDictionary(),
    False: weakref.WeakKeyDictionary(),
}


def _code(obj: Any, top: bool, package: str) -> tuple[str, list[tuple[str, Any]]]:
    memo = _CODE[top]
    try:
        hit = memo.get(obj)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None and hit[2] == package:
        return hit[0], hit[1]
    tree = _strip(_source_tree(obj), top=top)
    namespace = dict(vars(sys.modules[obj.__module__]))
    if isinstance(obj, types.FunctionType) and obj.__closure__:
        for var, cell in zip(obj.__code__.co_freevars, obj.__closure__, strict=True):
            with contextlib.suppress(ValueError):  # an empty cell
                namespace[var] = cell.cell_contents
    tree = _without_reports(tree, namespace)
    out: list[str] = []
    _dump(tree, out)
    dump, refs = "".join(out), _referenced(tree, namespace, package)
    with contextlib.suppress(TypeError):
        memo[obj] = (dump, refs, package)
    return dump, refs


def _source_tree(obj: Any) -> ast.AST:
    try:
        src = inspect.getsource(obj)
    except (OSError, TypeError) as e:
        raise TypeError(
            f"cannot fingerprint {obj.__module__}.{obj.__qualname__}: its source is not "
            f"available ({e}); define nodes and the code they call in a module file"
        ) from None
    return ast.parse(textwrap.dedent(src))


def _package(obj: Any) -> str:
    return (getattr(obj, "__module__", None) or "").partition(".")[0]


_CONST_TYPES = (int, float, str, bytes, bool, type(None), tuple, frozenset)


def _referenced(tree: ast.AST, namespace: dict, package: str) -> list[tuple[str, Any]]:
    """Names used in ``tree`` that resolve to same-package code or constants."""
    found: dict[str, Any] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in namespace:
            found[n.id] = namespace[n.id]
        elif (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and isinstance(namespace.get(n.value.id), types.ModuleType)
        ):
            mod = namespace[n.value.id]
            if mod.__name__.partition(".")[0] == package and hasattr(mod, n.attr):
                found[f"{n.value.id}.{n.attr}"] = getattr(mod, n.attr)
    out: list[tuple[str, Any]] = []
    for name, obj in sorted(found.items()):
        if isinstance(obj, Node):
            obj = obj.fn
        if isinstance(obj, types.FunctionType | type) and _package(obj) == package:
            out.append((name, obj))
        elif isinstance(obj, _CONST_TYPES) and not isinstance(obj, type):
            try:
                key(obj)
            except TypeError:
                continue
            out.append((name, obj))
    return out


def fingerprint(fn: Callable) -> str:
    """Hex fingerprint of ``fn``'s normalized code and the code it reaches.

    See the module docstring for what it covers and what it cannot see.
    """
    fn = getattr(fn, "fn", fn)
    cached = getattr(fn, "__flow_fingerprint__", None)
    if cached is not None:
        return cached
    package = _package(fn)
    disk = _disk_cache_path(fn, package)
    if disk is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            digest = disk.read_text("ascii").strip()
            if len(digest) == 2 * 16 and all(c in "0123456789abcdef" for c in digest):
                with contextlib.suppress(AttributeError):
                    fn.__flow_fingerprint__ = digest  # type: ignore[union-attr]  # a function
                return digest
    parts: list[tuple[str, str]] = []
    seen: set[int] = set()

    def visit(name: str, obj: Any, top: bool) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if not isinstance(obj, types.FunctionType | type):
            parts.append((name, key(obj).hex()))
            return
        dump, refs = _code(obj, top, package)
        parts.append((name, dump))
        for ref_name, ref in refs:
            visit(ref_name, ref, False)

    visit("", fn, True)
    digest = key(parts).hex()
    with contextlib.suppress(AttributeError):
        fn.__flow_fingerprint__ = digest  # type: ignore[union-attr]  # a function
    if disk is not None:
        with contextlib.suppress(OSError):
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_name(f"{disk.name}.{os.getpid()}.tmp")
            tmp.write_text(digest, "ascii")
            os.replace(tmp, disk)
    return digest


# A fingerprint depends only on the source of the package's modules, their module-level
# constants and the fingerprinting code itself: a new process (a `flow` command) finds
# it on disk under a key of exactly those -- file *contents*, not stats -- instead of
# parsing the sources again (0.2-0.3 s per command for the pipeline's nodes).
def _file_digest(path: str) -> bytes:
    with open(path, "rb") as f:  # read every time: a file rewritten in this process counts
        return bytes(key(f.read()))


def _disk_cache_path(fn: Callable, package: str) -> Path | None:
    """Where ``fn``'s fingerprint is remembered, or None (closures, no source files,
    ``FLOW_FINGERPRINT_CACHE=0``)."""
    where = os.environ.get("FLOW_FINGERPRINT_CACHE", "")
    if where == "0" or not package or getattr(fn, "__closure__", None):
        return None
    try:
        parts: list[Any] = [sys.version, _file_digest(__file__), fn.__module__, fn.__qualname__]
        for name in sorted(sys.modules):
            if name != package and not name.startswith(package + "."):
                continue
            mod = sys.modules[name]
            path = getattr(mod, "__file__", None)
            if path is None:
                continue  # a namespace package: no code of its own
            consts = []
            for k, v in sorted(vars(mod).items()):
                if isinstance(v, _CONST_TYPES) and not isinstance(v, type):
                    with contextlib.suppress(TypeError):
                        consts.append((k, bytes(key(v))))
            parts.append((name, _file_digest(path), tuple(consts)))
        digest = key(tuple(parts)).hex()
    except (OSError, TypeError, AttributeError):
        return None
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flow"
    base = Path(where) if where else home
    return base / "fingerprints" / digest[:2] / digest


# --------------------------------------------------------------------------
# parameters


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Bring a configured value to the default's type, or say why not."""
    if isinstance(value, list):
        value = tuple(_coerce(name, v, None) for v in value)
    if default is None or default is inspect.Parameter.empty:
        pass
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"parameter {name!r} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"parameter {name!r} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"parameter {name!r} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError(f"parameter {name!r} must be a string, got {value!r}")
    elif isinstance(default, tuple) and not isinstance(value, tuple):
        raise TypeError(f"parameter {name!r} must be a list, got {value!r}")
    try:
        key(value)
    except TypeError as e:
        raise TypeError(f"parameter {name!r}: {e}") from None
    return value


def _params_class(name: str, params: list[inspect.Parameter]) -> type:
    fields: list[tuple[Any, ...]] = []
    for p in params:
        if p.default is inspect.Parameter.empty:
            fields.append((p.name, Any))
        else:
            fields.append((p.name, Any, field(default=p.default)))
    cls = dataclasses.make_dataclass(
        f"{name}_params", fields, frozen=True, slots=True, namespace={"__flow_name__": name}
    )
    cls.__module__ = "flow.params"
    return cls


# --------------------------------------------------------------------------
# the decorator


@dataclass(frozen=True, eq=False)
class Node:
    """A decorated node function; call it like the function."""

    fn: Callable
    name: str
    version: int | str
    kind: Literal["item", "set"]
    inputs: tuple[str, ...]
    Params: type
    batched: bool = False
    batch_size: int | None = None
    doc: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<node {self.name} v{self.version} ({self.kind})>"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fn)

    def params(self, config: Any = None, /, **overrides: Any) -> Any:
        """A validated, frozen parameter config from a mapping and/or keywords.

        Unknown names and values of the wrong type raise ``TypeError`` naming
        the node and the parameter.
        """
        if isinstance(config, self.Params):
            config = dataclasses.asdict(config)  # type: ignore[call-overload]  # a dataclass
        values = dict(config or {})
        values.update(overrides)
        names = {f.name: f for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise TypeError(
                f"node {self.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters are {', '.join(sorted(names)) or '(none)'}"
            )
        coerced = {}
        for n, f in names.items():
            default = f.default if f.default is not dataclasses.MISSING else None
            if n in values:
                try:
                    coerced[n] = _coerce(n, values[n], default)
                except TypeError as e:
                    raise TypeError(f"node {self.name!r}: {e}") from None
            elif f.default is dataclasses.MISSING:
                raise TypeError(f"node {self.name!r}: parameter {n!r} must be set")
        return self.Params(**coerced)

    def prefix(self, params: Any) -> Key:
        """The node-level key: name, version, code fingerprint, parameters."""
        return key(
            ("flow-node", self.name, self.version, self.fingerprint, dataclasses.asdict(params))
        )


def node(
    fn: Callable | None = None,
    *,
    version: int | str,
    kind: Literal["item", "set"] = "item",
    name: str | None = None,
    batched: bool = False,
    batch_size: int | None = None,
) -> Any:
    """Declare a node.  ``version=`` is required: bump it when the output
    changes for a reason the code fingerprint cannot see.

    ``batched=True`` (item nodes only): the function receives one list per
    item input and returns a list, one output per item, in order.
    ``batch_size``: items per task (an execution hint, not part of the key).
    """
    if version is None or isinstance(version, bool) or not isinstance(version, int | str):
        raise TypeError("node(version=...) must be an int or a str")
    if kind not in ("item", "set"):
        raise ValueError(f"kind must be 'item' or 'set', not {kind!r}")
    if batched and kind != "item":
        raise ValueError("batched=True is for item nodes")

    def deco(f: Callable) -> Node:
        sig = inspect.signature(f)
        inputs, params = [], []
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                if p.default is not p.empty:
                    raise TypeError(
                        f"{f.__qualname__}: input {p.name!r} has a default; parameters "
                        "go after '*' as keyword-only arguments"
                    )
                inputs.append(p.name)
            elif p.kind == p.KEYWORD_ONLY:
                params.append(p)
            else:
                raise TypeError(f"{f.__qualname__}: *args/**kwargs are not allowed in a node")
        nname = name or f.__name__
        n = Node(
            fn=f,
            name=nname,
            version=version,
            kind=kind,
            inputs=tuple(inputs),
            Params=_params_class(nname, params),
            batched=batched,
            batch_size=batch_size,
            doc=(inspect.getdoc(f) or "").split("\n", 1)[0],
        )
        for p in params:
            if p.default is not p.empty:
                try:
                    key(p.default)
                except TypeError as e:
                    raise TypeError(f"{f.__qualname__}: default of {p.name!r}: {e}") from None
        return n

    return deco(fn) if fn is not None else deco
