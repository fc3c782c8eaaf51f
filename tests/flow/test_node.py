"""The node decorator: code fingerprints, parameters, inputs.

Fingerprint tests write variants of a small package (``mod.py`` holding the
node, ``helpers.py`` the same-package code it calls) under ``tmp_path`` and
import each under a unique package name, so every variant is fresh code.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import sys
import textwrap
from collections.abc import Callable

import numpy as np
import pytest

from flow import Items, node
from flow.keys import key
from flow.node import Node, fingerprint

MOD = '''
import numpy as np

from flow import node

from . import helpers
from .helpers import scaled

_OFFSET = 1.0


@node(version=1)
def transformed(image: np.ndarray, *, gain: float = 2.0) -> np.ndarray:
    """Scale, shift and clip an image."""
    y = scaled(image, gain)
    return helpers.clipped(y + _OFFSET)
'''

HELPERS = """
import numpy as np

_LIMIT = 10.0


def scaled(x, gain):
    return x * gain


def clipped(x):
    return np.minimum(x, _LIMIT)
"""

_serial = itertools.count()


@pytest.fixture
def load(tmp_path, monkeypatch) -> Callable[..., Node]:
    """``load(mod=..., helpers=..., **other_files)`` -> the ``transformed`` node of a
    fresh package; ``LIB`` in a source names a second, separate package."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(mod: str = MOD, helpers: str = HELPERS, lib: str | None = None) -> Node:
        n = next(_serial)
        pkg, libpkg = f"fp_pkg_{n}", f"fp_lib_{n}"
        for name, files in (
            (pkg, {"mod.py": mod, "helpers.py": helpers}),
            (libpkg, {"tools.py": lib}),
        ):
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("")
            for fname, src in files.items():
                if src is not None:
                    (tmp_path / name / fname).write_text(
                        textwrap.dedent(src).replace("LIB", libpkg)
                    )
            created.append(name)
        importlib.invalidate_caches()
        return importlib.import_module(f"{pkg}.mod").transformed

    yield make
    for mod in [m for m in sys.modules if m.partition(".")[0] in created]:
        del sys.modules[mod]


def test_fingerprint_is_the_same_for_the_same_code(load):
    a, b = load(), load()
    assert a.fingerprint == b.fingerprint == fingerprint(b.fn) == fingerprint(b)
    assert len(a.fingerprint) == 32
    np.testing.assert_array_equal(a(np.array([1.0, 9.0])), [3.0, 10.0])


COSMETIC = {
    "comments": lambda s: s.replace(
        "    y = scaled(image, gain)\n", "    # scale first\n    y = scaled(image, gain)  # here\n"
    ),
    "docstring": lambda s: s.replace('"""Scale, shift and clip an image."""', '"""Other words."""'),
    "no docstring": lambda s: s.replace('    """Scale, shift and clip an image."""\n', ""),
    "blank lines": lambda s: s.replace(
        "    y = scaled(image, gain)\n", "\n    y = scaled(image, gain)\n\n"
    ),
    "formatting": lambda s: s.replace(
        "scaled(image, gain)", "scaled(\n        image,\n        gain,\n    )"
    ),
    "annotations removed": lambda s: s.replace(
        "image: np.ndarray, *, gain: float = 2.0) -> np.ndarray:", "image, *, gain=2.0):"
    ),
    "annotations changed": lambda s: s.replace("-> np.ndarray:", "-> object:"),
    "decorator": lambda s: s.replace("@node(version=1)", "@node(\n    version=1, batch_size=16\n)"),
}


COSMETIC["progress reports"] = lambda s: s.replace(
    "from flow import node", "import flow\nfrom flow import node, progress"
).replace(
    "    y = scaled(image, gain)\n",
    "    progress(0, 2, loss=1.0)\n    y = scaled(image, gain)\n    flow.progress(1, 2)\n",
)


@pytest.mark.parametrize("change", COSMETIC.values(), ids=COSMETIC.keys())
def test_fingerprint_ignores_what_does_not_change_behaviour(load, change):
    variant = change(MOD)
    assert variant != MOD
    assert load(mod=variant).fingerprint == load().fingerprint


def test_fingerprint_ignores_local_annotation_changes(load):
    with_float = MOD.replace("    y = scaled", "    y: float = scaled")
    assert (
        load(mod=with_float).fingerprint
        == load(mod=with_float.replace("y: float", "y: int")).fingerprint
    )


def test_fingerprint_ignores_added_local_annotation(load):
    assert (
        load(mod=MOD.replace("    y = scaled", "    y: float = scaled")).fingerprint
        == load().fingerprint
    )


CHANGES = {
    "body": {"mod": MOD.replace("y + _OFFSET", "y - _OFFSET")},
    "same-package helper": {"helpers": HELPERS.replace("return x * gain", "return gain * x")},
    "helper reached as module attribute": {"helpers": HELPERS.replace("np.minimum", "np.maximum")},
    "constant of a helper": {"helpers": HELPERS.replace("_LIMIT = 10.0", "_LIMIT = 11.0")},
    "module constant": {"mod": MOD.replace("_OFFSET = 1.0", "_OFFSET = 2.0")},
    "parameter default": {"mod": MOD.replace("gain: float = 2.0", "gain: float = 3.0")},
}


@pytest.mark.parametrize("variant", CHANGES.values(), ids=CHANGES.keys())
def test_fingerprint_changes_with_the_code(load, variant):
    assert all(src != {"mod": MOD, "helpers": HELPERS}[f] for f, src in variant.items())
    assert load(**variant).fingerprint != load().fingerprint


def test_fingerprint_does_not_see_other_packages(load):
    """Documented in flow/node.py: code in other packages is not fingerprinted (bump version=)."""
    mod = MOD.replace("from .helpers import scaled", "from LIB.tools import scaled")
    lib = HELPERS.replace("def clipped", "def _unused")
    a = load(mod=mod, lib=lib)
    b = load(mod=mod, lib=lib.replace("return x * gain", "return x * gain * 100"))
    assert a.fingerprint == b.fingerprint
    assert not np.array_equal(a(np.ones(1)), b(np.ones(1)))  # yet the output changed


def test_fingerprint_needs_source():
    namespace: dict = {}
    exec("def made(x):\n    return x\n", namespace)
    n = node(namespace["made"], version=1)
    with pytest.raises(TypeError, match="source is not available"):
        _ = n.fingerprint


# --------------------------------------------------------------------------
# inputs and parameters


@node(version=1)
def resized(
    image,
    mask,
    *,
    size: int = 64,
    scale: float = 1.0,
    window: tuple = (0.0, 1.0),
    label: str = "x",
    flag: bool = False,
    anything=None,
):
    """Resize an image (a stand-in)."""
    return image


@node(version="2024-1", kind="set")
def fitted(features: Items, *, k: int):
    return np.zeros(k)


def test_inputs_are_positional_and_params_keyword_only():
    assert resized.inputs == ("image", "mask")
    assert [f.name for f in dataclasses.fields(resized.Params)] == [
        "size",
        "scale",
        "window",
        "label",
        "flag",
        "anything",
    ]
    assert resized.kind == "item" and fitted.kind == "set" and fitted.inputs == ("features",)
    assert resized.name == "resized" and resized.doc == "Resize an image (a stand-in)."
    assert resized(1, 2, size=3) == 1  # a node calls like its function


def test_params_defaults_and_coercion():
    p = resized.params()
    assert (p.size, p.scale, p.window, p.label, p.flag, p.anything) == (
        64,
        1.0,
        (0.0, 1.0),
        "x",
        False,
        None,
    )
    p = resized.params({"scale": 2, "window": [0, [1, 2]]}, size=32)
    assert type(p.scale) is float and p.scale == 2.0
    assert p.window == (0, (1, 2)) and p.size == 32
    assert resized.params({"size": 1}, size=2).size == 2  # keywords override the mapping
    assert resized.params(p) == p
    assert resized.params(anything=[1, "a"]).anything == (1, "a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.size = 1  # type: ignore[misc]
    assert key(resized.params(scale=2)) == key(resized.params(scale=2.0))
    assert key(resized.params(scale=2)) != key(resized.params())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sise": 3}, "node 'resized' has no parameter 'sise'"),
        ({"size": "64"}, "node 'resized': parameter 'size' must be an integer"),
        ({"size": 64.0}, "parameter 'size' must be an integer"),
        ({"size": True}, "parameter 'size' must be an integer"),
        ({"scale": "1"}, "node 'resized': parameter 'scale' must be a number"),
        ({"scale": False}, "parameter 'scale' must be a number"),
        ({"flag": 1}, "parameter 'flag' must be true or false"),
        ({"label": 3}, "parameter 'label' must be a string"),
        ({"window": "ab"}, "parameter 'window' must be a list"),
        ({"anything": object()}, "node 'resized': parameter 'anything'"),
    ],
)
def test_bad_params_raise_type_error_naming_node_and_param(overrides, message):
    with pytest.raises(TypeError, match=message):
        resized.params(**overrides)


def test_params_without_default_must_be_set():
    with pytest.raises(TypeError, match="node 'fitted': parameter 'k' must be set"):
        fitted.params()
    assert fitted.params(k=3).k == 3


def test_version_is_required():
    def f(x):
        return x

    with pytest.raises(TypeError):
        node(f)  # type: ignore[call-arg]
    for bad in (None, True, 1.5, (1,)):
        with pytest.raises(TypeError, match="version"):
            node(f, version=bad)  # type: ignore[arg-type]
    assert node(f, version="v2").version == "v2"


_UNKEYABLE = object()


def test_signature_errors():
    def with_default(x, y=1, *, k=2):
        return x

    def varargs(*xs):
        return xs

    def kwargs(x, **kw):
        return x

    def unkeyable(x, *, k=_UNKEYABLE):
        return x

    with pytest.raises(TypeError, match="input 'y' has a default"):
        node(with_default, version=1)
    with pytest.raises(TypeError, match=r"\*args/\*\*kwargs"):
        node(varargs, version=1)
    with pytest.raises(TypeError, match=r"\*args/\*\*kwargs"):
        node(kwargs, version=1)
    with pytest.raises(TypeError, match="default of 'k'"):
        node(unkeyable, version=1)
    with pytest.raises(ValueError, match="kind"):
        node(kwargs, version=1, kind="many")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batched"):
        node(varargs, version=1, kind="set", batched=True)


def test_prefix_covers_name_version_params_but_not_hints():
    def f(x, *, k: int = 1):
        return x

    base = node(f, version=1)
    p = base.params()
    assert base.prefix(p) == node(f, version=1, batch_size=8, batched=True).prefix(p)
    assert base.prefix(p) != node(f, version=2).prefix(p)
    assert base.prefix(p) != node(f, version=1, name="g").prefix(
        node(f, version=1, name="g").params()
    )
    assert base.prefix(p) != base.prefix(base.params(k=2))


def _fresh_fingerprint(root, cache, env_extra=None) -> str:
    """``transformed``'s fingerprint in a new interpreter (package ``fpc_pkg`` in root)."""
    import os
    import subprocess

    env = {**os.environ, "FLOW_FINGERPRINT_CACHE": str(cache), **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    code = "from fpc_pkg.mod import transformed; print(transformed.fingerprint)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_fingerprint_disk_cache_follows_sources_and_constants(tmp_path):
    """A new process reuses a remembered fingerprint only while the package's sources
    and module-level constants (also those computed at import) are the same."""
    pkg, cache = tmp_path / "fpc_pkg", tmp_path / "cache"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    helpers = HELPERS.replace(
        "_LIMIT = 10.0", "import os\n\n_LIMIT = 10.0\n_SCALE = float(os.environ['FP_SCALE'])"
    ).replace("return x * gain", "return x * gain * _SCALE")

    def fp(helpers_src: str, scale: str = "1", **env) -> str:
        (pkg / "mod.py").write_text(textwrap.dedent(MOD))
        (pkg / "helpers.py").write_text(textwrap.dedent(helpers_src))
        return _fresh_fingerprint(tmp_path, cache, {"FP_SCALE": scale, **env})

    a = fp(helpers)
    assert any(cache.rglob("*")), "nothing remembered"
    assert fp(helpers) == a == fp(helpers, FLOW_FINGERPRINT_CACHE="0")
    b = fp(helpers.replace("return np.minimum", "return np.maximum"))
    assert b != a and b == fp(helpers.replace("return np.minimum", "return np.maximum"),
                              FLOW_FINGERPRINT_CACHE="0")  # fmt: skip
    assert fp(helpers.replace("_LIMIT = 10.0", "_LIMIT = 11.0")) not in (a, b)
    assert fp(helpers, scale="2") != a  # a constant computed at import time
    assert fp(helpers) == a


def test_a_progress_report_is_not_code_but_what_it_reports_from_is(load):
    """Only a statement that *only* reports is left out: a report inside an
    expression, or a function of another name, still counts."""
    reported = MOD.replace("from flow import node", "from flow import node, progress")
    inline = reported.replace(
        "    y = scaled(image, gain)\n", "    y = scaled(image, gain) + (progress(1, 1) or 0)\n"
    )
    assert load(mod=inline).fingerprint != load().fingerprint
    other = MOD.replace(
        "    y = scaled(image, gain)\n", "    print(1, 2)\n    y = scaled(image, gain)\n"
    )
    assert load(mod=other).fingerprint != load().fingerprint


def test_progress_reports_reach_the_sink_set_for_the_block():
    from flow import progress
    from flow.reporting import reporting

    got = []
    progress(1, 2)  # nowhere: nothing happens
    with reporting(lambda done, total, info: got.append((done, total, info))):
        progress(1, 3, loss=np.float32(0.5), stage="warm-up")
    progress(2, 3)
    assert got == [(1, 3, {"loss": 0.5, "stage": "warm-up"})]
