"""The shape of the code, checked: parts a reader can hold in their head.

Modules of at most 400 lines, classes of at most 400, functions of at most 60; only the
FUSE package (nixfs/fuse/) imports pyfuse3, and the overlay model nothing of it; no import
cycle inside the package; no part sets another part's attribute (daemon/assemble.py wires
them, in constructor arguments).  A part that must be longer says why in its docstring and
is named in ALLOWED below, with its current size,
so it can only shrink (the redesign of issue 19 emptied it).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nixfs"

MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 400, 400, 60

# (kind, file relative to the package, name) -> the size allowed for now.
ALLOWED: dict[tuple[str, str, str], int] = {}

# Where pyfuse3 may be imported: the FUSE package alone (files under it; the rest of the
# daemon reaches pyfuse3 through fuse/session.py and fuse/features.py).
PYFUSE3_IMPORTERS = ("fuse/",)


def _sources(with_lines=False):
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text, str(path))
        rel = path.relative_to(PACKAGE).as_posix()
        yield (rel, tree, text.count("\n")) if with_lines else (rel, tree)


def _sizes():
    """(kind, file, name) -> lines, for every module, class and function."""
    for rel, tree, lines in _sources(with_lines=True):
        yield ("module", rel, ""), lines
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                yield ("class", rel, node.name), node.end_lineno - node.lineno + 1
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ("function", rel, node.name), node.end_lineno - node.lineno + 1


LIMITS = {"module": MAX_MODULE, "class": MAX_CLASS, "function": MAX_FUNCTION}


def test_no_part_is_too_long():
    too_long = []
    for key, lines in _sizes():
        allowed = max(LIMITS[key[0]], ALLOWED.get(key, 0))
        if lines > allowed:
            too_long.append(f"{key[0]} {key[1]} {key[2]}: {lines} lines (at most {allowed})")
    assert not too_long, "\n".join(too_long)


def test_allowances_still_needed():
    """An allowance the code no longer needs is taken off the list (it only shrinks)."""
    sizes = dict(_sizes())
    stale = [k for k, allowed in ALLOWED.items()
             if sizes.get(k, 0) <= LIMITS[k[0]] or sizes.get(k, 0) < allowed]
    assert not stale, f"lower or remove these allowances: {stale}"


def _imports(tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_only_the_adapter_imports_pyfuse3():
    importers = {rel for rel, tree in _sources()
                 if any(m.split(".")[0] == "pyfuse3" for m in _imports(tree))}
    outside = {rel for rel in importers if not rel.startswith(PYFUSE3_IMPORTERS)}
    assert not outside, outside


def test_the_model_never_reaches_the_adapter():
    """The overlay model answers in its own types: it imports nothing of nixfs.fuse."""
    graph = _package_graph()
    reaching = {m: sorted(d for d in deps if d.startswith("nixfs.fuse"))
                for m, deps in graph.items() if m.startswith("nixfs.overlay")}
    assert not {m: d for m, d in reaching.items() if d}


def _module_name(rel: str) -> str:
    name = "nixfs." + rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative imports resolved)."""
    graph = {}
    modules = {_module_name(rel) for rel, _ in _sources()}
    for rel, tree in _sources():
        me = _module_name(rel)
        package = me if rel.endswith("__init__.py") else me.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                module = (f"{base}.{node.module}" if node.module else base) if node.level \
                    else (node.module or "")
                # "from . import layers" needs the module layers, not the package.
                names = {f"{module}.{a.name}" for a in node.names}
                deps.update(names if names <= modules else names | {module})
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[me] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycle():
    graph = _package_graph()
    state: dict[str, int] = {}

    def visit(module, trail):
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# Names under which nixfs holds its parts (the long-lived objects the daemon is built of:
# overlay, adapter, policies, caches, services), as variables or attributes.  Records
# (nodes, handles, listing entries, pyfuse3's structures, a config) are not parts: their
# fields are set by whoever owns them.
PART_NAMES = {
    "overlay", "fs", "ops", "notify", "notifier", "snapshots", "stale_attrs", "policy",
    "service", "worker", "sync", "index", "dircache", "store", "listings", "inodes", "state",
    "lower", "upper", "layer", "runner", "fds", "file_fds", "lower_files", "server", "control", "daemon",
}

# (file, "holder.attribute") -> why it is set from outside for now.
SETS_ALLOWED = {
    # A lower call's thread says the call has answered; the runner reads the flag.
    ("overlay/lowerrunner.py", "self.runner.out"),
}


def _attribute_sets():
    """(file, "holder.attribute") of every assignment to an attribute of a part."""
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            else:
                continue
            for target in targets:
                for t in ast.walk(target):
                    if not (isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store)):
                        continue
                    holder = t.value
                    name = holder.attr if isinstance(holder, ast.Attribute) else \
                        holder.id if isinstance(holder, ast.Name) else None
                    if name in PART_NAMES:
                        yield rel, ast.unparse(t)


def test_no_part_sets_another_parts_attribute():
    """Parts are wired by constructor arguments, in one place: an attribute of a part
    set from outside it (``overlay.policy = ...``) hides who depends on whom."""
    found = set(_attribute_sets())
    assert not found - SETS_ALLOWED, sorted(found - SETS_ALLOWED)
    assert not SETS_ALLOWED - found, f"no longer needed: {sorted(SETS_ALLOWED - found)}"


@pytest.mark.parametrize("tier", ["unit", "mount", "system"])
def test_each_test_tier_runs_on_its_own(tier):
    """``scripts/test TIER`` collects one folder alone: a test module that needs another
    tier's module on the path (a fixture imported from it) breaks that."""
    import subprocess
    import sys
    tests = PACKAGE.parent / "tests"
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                        "no:cacheprovider", str(tests / tier)], cwd=PACKAGE.parent,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:]
