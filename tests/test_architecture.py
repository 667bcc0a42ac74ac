"""The package's shape: no import cycle, and a new rule is one file.

``test_no_import_cycle`` reads every module's imports (module level and inside functions, where
the package defers its heavy ones) with ``ast`` and looks for a cycle: importing a module also
runs each package ``__init__`` above it that the importer is not inside of.
``test_a_rule_in_one_file`` registers the rule of ``extra_rule.py`` and finds it used by
``attention``, ``build``, ``tune`` and ``inspect`` with nothing else edited.
"""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import tvmflash
from tvmflash import KernelSpec, rules
from tvmflash.cli import main
from tvmflash.definition import attention_reference

from helpers import assert_close_to_reference, make_qkv

PACKAGE = Path(tvmflash.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package modules ``name`` imports (resolved; a ``from P import X`` names P.X where that
    is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _edges(modules: dict) -> dict[str, set[str]]:
    edges = {}
    for name, path in modules.items():
        out = set()
        for target in _imports(name, path, modules):
            out.add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):  # the packages above it that ``name`` is not inside
                ancestor = ".".join(parts[:i])
                if not (name == ancestor or name.startswith(ancestor + ".")):
                    out.add(ancestor)
        edges[name] = out
    return edges


def _cycle(edges: dict) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    modules = _modules(PACKAGE)
    assert len(modules) > 30 and "tvmflash.rules.base" in modules
    cycle = _cycle(_edges(modules))
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one(tmp_path):
    """On a package that has one (the pre-registry layout's build -> records -> space -> build,
    written in functions): found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .build import build\n")
    (pkg / "build.py").write_text("from . import records\n\ndef build():\n    pass\n")
    (pkg / "records.py").write_text("def f():\n    from .space import space_for\n")
    (pkg / "space.py").write_text("def space_for():\n    from .build import build\n")
    assert _cycle(_edges(_modules(pkg))) == ["pkg.build", "pkg.records", "pkg.space", "pkg.build"]


@pytest.fixture
def extra_rule():
    import extra_rule

    rule = rules.register(extra_rule.RULE)
    yield rule
    rules.unregister(rule)


def test_a_rule_in_one_file(extra_rule, tmp_path, monkeypatch, rng, capsys):
    """A rule defined in one file (tests/extra_rule.py) and registered: ``attention`` runs its
    kernel, ``build`` records it, ``tune`` searches its space and ``inspect`` shows it."""
    monkeypatch.setenv("TVMFLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TVMFLASH_TUNING_LOGS", str(tmp_path / "logs"))
    spec = KernelSpec(64, causal=True)
    assert rules.rule_for(spec) is extra_rule
    assert rules.rule_for(spec.replace(head_dim=128)).name == "fused_cpu"  # what it does not claim

    # attention: the rule's kernel, built into the cache, correct
    q, k, v = make_qkv(rng, 1, 70, 90, 2, 2, 64, "float16")
    out, lse = tvmflash.attention(q, k, v, causal=True, return_lse=True)
    assert_close_to_reference(out, lse, *attention_reference(q, k, v, causal=True), "float16")
    assert tvmflash.get_kernel(spec).manifest["schedule"]["rule"] == extra_rule.name

    # build: the manifest names the rule and its config
    _, manifest = tvmflash.build(spec, tmp_path / "out")
    schedule = json.loads(Path(manifest).read_text())["schedule"]
    assert schedule["rule"] == extra_rule.name and schedule["config"] == {"block_m": 16, "block_n": 32, "vec": 8}

    # tune: its design space, its log; build then replays its record
    from tvmflash.tuning import TuneOptions, space as SP, tune

    res = tune(spec, TuneOptions(trials=1, work_dir=tmp_path / "work", shape=SP.Shape(1, 64, 64, 2, 2),
                                 logs_dir=tmp_path / "logs", progress=False, seed=0), log=lambda msg: None)
    assert res.best is not None and res.best.tile in extra_rule.space(spec).tiles
    meta = json.loads(Path(res.log_dir, "tuning.json").read_text())
    assert meta["rule"] == extra_rule.name
    _, manifest = tvmflash.build(spec, tmp_path / "tuned")
    schedule = json.loads(Path(manifest).read_text())["schedule"]
    assert schedule["source"] == "tuned record" and schedule["rule"] == extra_rule.name

    # inspect: the spec flags' kernel, built by the rule
    assert main(["inspect", "--target", "cpu", "--head-dim", "64", "--causal"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["schedule"]["rule"] == extra_rule.name
    assert np.isfinite(out.astype(np.float32)).all()
