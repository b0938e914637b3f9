"""The package's import architecture: imports point one way, from high layers to low ones.

Every module of tgem is parsed with :mod:`ast` (nothing is imported for the static checks).
``LAYERS`` below is the package's layer map, the same picture as ``docs/architecture.rst``. A
module may import modules of its own layer or of lower ones, never of a higher layer; the
import graph must have no cycle; and no function-level import of a tgem module may exist (it
would only hide a cycle or an upward import). ``ALLOWED`` lists the violations that remain,
each with its reason; the test also fails when one of them disappears, so the list can only
shrink.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tgem"

#: The layer map, from the bottom (0) up. A module name maps to its layer; a package name
#: (``tgem._kernels``, ``tgem.datasets``, ``tgem.interpret``, ``tgem.attention``,
#: ``tgem.plotting``) covers its submodules.
LAYERS: dict[str, int] = {
    # 0  bottom: imports nothing from tgem
    "tgem._text": 0,  # message helpers
    "tgem._finite": 0,  # the input limit, finiteness checks
    "tgem._calibration": 0,  # temperature scaling, rejection scores, conformal sets
    "tgem._runtime": 0,  # devices, threads, seeds, batches, out-of-memory retries
    "tgem._naming": 0,  # default gene names, labels to class indices
    "tgem._sampling": 0,  # stratified subsampling, the importances' training sample
    "tgem._novelty": 0,  # the "neighbors" rule's reference of training cells
    "tgem._version": 0,  # __version__
    "tgem._presets": 0,  # parameter values of 0.1 and of the original
    "tgem._standardize": 0,  # per-gene statistics
    "tgem._scale": 0,  # the log-scale check
    "tgem._reporting": 0,  # metrics tables
    "tgem._quadrature": 0,  # the fixed quadrature rules of the path integrals
    "tgem._memory": 0,  # what this process may still allocate; the check that a result fits
    "tgem.exceptions": 0,
    # 1  the attention kernels: registry, reference, exact, native, compiled, triton, tree
    "tgem._kernels": 1,
    # 2  numerics on top of the kernels
    "tgem._model": 2,  # the T-GEM network (nn.Module)
    "tgem._distributed": 2,  # DDP helpers
    # 3  the training loop; what pickles and model files share
    "tgem._training": 3,
    "tgem._serialization": 3,  # the network as arrays, the device a loaded model runs on
    # 4  data: .h5ad, readers, gene ids, gene sets, alignment, the estimator's input checks
    "tgem._h5ad": 4,
    "tgem._h5ad_checks": 4,  # checks of untrusted .h5ad files before anything is read
    "tgem._inputs": 4,  # fit / predict input checks, .h5ad polymorphism, held-out splits
    "tgem.datasets": 4,
    "tgem._gene_sets": 4,
    "tgem._alignment": 4,
    # 5  analysis of a fitted classifier (read through its attributes; the estimator above
    #    imports the three functions its pass-throughs call)
    "tgem.interpret": 5,  # attributions (_ig, _attribute), rankings, ablation, importances
    "tgem.attention": 5,  # entropy, maps, attention attribution (_lig), gene networks
    "tgem._rejection": 5,  # rejection scores, thresholds, labels with "unassigned"
    # 6  the model file and checkpoints
    "tgem._io": 6,  # save, load (writing; the format's description)
    "tgem._io_format": 6,  # constants, checksum, JSON number codes, the registered class
    "tgem._io_read": 6,  # the container: regular file, size caps, ZIP, checksum, .npy
    "tgem._io_build": 6,  # the content: parameters, network, labels, fitted attributes
    "tgem._checkpoints": 6,  # fit(checkpoint=...): lock, writer
    # 7  the estimator
    "tgem._classifier": 7,
    # 8  applications of the estimator
    "tgem._annotate": 8,
    "tgem.dask": 8,
    "tgem._versions": 8,
    "tgem.plotting": 8,
    "tgem.cli": 8,  # the tgem command: parser, one module per command group, output
    # 9  the public API
    "tgem": 9,
    # 10 compatibility shims for old private paths (nothing in tgem imports them)
    "tgem._attention": 10,
    "tgem._native": 10,
    "tgem._compiled": 10,
    "tgem._triton_attention": 10,
    "tgem._tree": 10,
}

#: Violations that remain: (importer, imported, kind) -> reason. Remove an entry when its
#: violation is fixed (the test fails while a listed violation no longer exists).
ALLOWED: dict[tuple[str, str, str], str] = {}

#: Modules longer than LONG_LINES lines, each with the reason it stays one module (the same
#: list as docs/architecture.rst, "Long modules"). A module that grows past the limit must be
#: split or listed here; one that shrinks below it must leave the list.
LONG_LINES = 500
LONG_MODULES: dict[str, str] = {
    "tgem/_classifier.py": "the estimator's docstrings (about 360 lines) are its reference",
    "tgem/_kernels/_tree.py": "one algorithm: forward, backward and entropy share its sums",
    "tgem/_kernels/_native.py": "the ctypes bindings and the autograd function of one kernel",
    "tgem/_kernels/_triton.py": "the Triton kernels and their launchers, one algorithm",
    "tgem/_h5ad.py": "H5ADDataset, one class of about 380 lines, and its epoch reader",
    "tgem/datasets/_gene_ids.py": "the matching steps of match_genes and their report",
}

#: Optional extras: `import tgem` must not import them (each is imported where it is used).
OPTIONAL = ("matplotlib", "anndata", "h5py", "networkx", "triton", "dask", "distributed")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    name = module
    while name:
        if name in LAYERS:
            return LAYERS[name]
        name = name.rpartition(".")[0]
    raise AssertionError(f"{module} has no layer: add it to LAYERS (and docs/architecture.rst)")


def _owner(target: str, modules: dict[str, Path]) -> str:
    """The tgem module that ``target`` (a module or a name in one) refers to."""
    while target not in modules:
        target = target.rpartition(".")[0]
    return target


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """``(imported tgem module, kind)`` for each import in ``module``; kind is "top" or
    "function-level" (inside a def or a class body's def)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module if is_package else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    stem = f"{base}.{child.module}" if child.module else base
                else:
                    stem = child.module or ""
                targets = [f"{stem}.{alias.name}" for alias in child.names]
            for target in targets:
                if target == "tgem" or target.startswith("tgem."):
                    owner = _owner(target, modules)
                    if owner != module:
                        found.append((owner, "function-level" if inner else "top"))
            visit(child, inner)

    visit(tree, False)
    return found


def _violations():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    violations = set()
    for module, path in modules.items():
        for imported, kind in _imports(module, path, modules):
            if kind == "top":
                graph[module].add(imported)
            if kind == "function-level":
                violations.add((module, imported, kind))
            elif _layer(imported) > _layer(module):
                violations.add((module, imported, "upward"))
    return violations, graph


def test_long_modules_are_listed_with_their_reason():
    lengths = {str(p.relative_to(ROOT)): p.read_text().count("\n") for p in PACKAGE.rglob("*.py")}
    unlisted = sorted(m for m, n in lengths.items() if n > LONG_LINES and m not in LONG_MODULES)
    assert not unlisted, (
        f"modules over {LONG_LINES} lines without a reason: {unlisted}; split them, or add "
        "them to LONG_MODULES here and to docs/architecture.rst with the reason."
    )
    shrunk = sorted(m for m in LONG_MODULES if lengths.get(m, 0) <= LONG_LINES)
    assert not shrunk, f"{shrunk} are no longer long: remove them from LONG_MODULES."
    text = (ROOT / "docs" / "architecture.rst").read_text()
    assert all(f"``{m}``" in text for m in LONG_MODULES), "list them in docs/architecture.rst"


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_module_imports_a_higher_layer_or_inside_a_function():
    violations, _ = _violations()
    new = sorted(v for v in violations if v not in ALLOWED)
    assert not new, (
        "imports against the layer map (importer, imported, kind): "
        f"{new}. Move the import to the top of the module, or the code to the right layer; "
        "see docs/architecture.rst."
    )


def test_allowlisted_violations_still_exist():
    """The allowlist can only shrink: remove an entry once its violation is fixed."""
    violations, _ = _violations()
    gone = sorted(v for v in ALLOWED if v not in violations)
    assert not gone, f"these allowlisted violations are fixed; delete them from ALLOWED: {gone}"


def test_the_top_level_import_graph_has_no_cycle():
    _, graph = _violations()
    state: dict[str, int] = {}

    def walk(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            # a package's own submodules are imported through it: not a cycle
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*trail, node, nxt])}")
            if nxt not in state:
                walk(nxt, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])


def _run(code: str) -> subprocess.CompletedProcess:
    # without the compiled backend, "auto" never compiles (minutes on a small machine)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TGEM_DISABLE_COMPILE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_import_tgem_leaves_the_optional_extras_and_backends_unimported():
    code = (
        "import sys, tgem\n"
        f"extras = {OPTIONAL!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in extras))\n"
        "print(sorted(m for m in sys.modules if m in ('torch._dynamo', 'tgem._kernels._native',"
        " 'tgem._kernels._compiled', 'tgem._kernels._triton', 'tgem._kernels._tree')))\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr[-2000:]
    extras, backends = done.stdout.strip().splitlines()
    assert extras == "[]", f"import tgem imported optional extras: {extras}"
    # the optional backends load on the registry's first use (torch.compile costs ~1.5 s)
    assert backends == "[]", f"import tgem imported optional backends: {backends}"


BROKEN_BACKEND = """
import importlib.abc, sys

class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            raise {error}("simulated broken backend")
        return None

sys.meta_path.insert(0, Broken())
import numpy as np
import tgem
from tgem._kernels import backend_names, backend_status, resolve_backend

assert {name!r} not in backend_names(), backend_names()
status = backend_status("cpu")
assert status[{module!r}].startswith("failed to import: {error}"), status
assert resolve_backend("auto", "cpu").name in backend_names()
assert "failed to import" in str(tgem.versions()) or {name!r} != "native"
rng = np.random.default_rng(0)
X = rng.normal(size=(24, 5)).astype(np.float32)
y = np.arange(24) % 2
clf = tgem.TGEMClassifier(n_layers=1, n_heads=2, max_epochs=2, random_state=0).fit(X, y)
assert clf.predict_proba(X).shape == (24, 2)
print("ok")
"""


@pytest.mark.parametrize(
    "name, module, error",
    [
        ("native", "tgem._kernels._native", "RuntimeError"),
        ("compiled", "tgem._kernels._compiled", "ImportError"),
        ("triton", "tgem._kernels._triton", "ImportError"),
        ("tree", "tgem._kernels._tree", "OSError"),
    ],
)
def test_a_backend_that_fails_to_import_never_breaks_tgem(name, module, error):
    done = _run(BROKEN_BACKEND.format(name=name, module=module, error=error))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_old_private_paths_resolve_to_the_moved_objects():
    import tgem._attention as old_attention
    import tgem._compiled as old_compiled
    import tgem._native as old_native
    import tgem._tree as old_tree
    import tgem._triton_attention as old_triton
    from tgem import _kernels
    from tgem._kernels import _compiled, _exact, _native, _registry, _tree, _triton

    assert old_attention._BACKENDS is _registry._BACKENDS
    assert old_attention.exact_attention is _exact.exact_attention
    assert old_attention.reference_attention is _kernels.reference_attention
    assert old_attention.resolve_backend is _kernels.resolve_backend
    assert old_native.native_attention is _native.native_attention
    assert old_compiled.compiled_attention is _compiled.compiled_attention
    assert old_triton.triton_attention is _triton.triton_attention
    assert old_tree.tree_attention is _tree.tree_attention


def _environment_after_import(**env) -> str:
    """``OMP_WAIT_POLICY`` after ``import tgem`` in a fresh process started with ``env``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "TGEM_SET_OMP_WAIT_POLICY")  # conftest sets the first
    }
    code = "import os, tgem\nprint(os.environ.get('OMP_WAIT_POLICY', '<unset>'))\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**base, "PYTHONPATH": str(ROOT), "TGEM_DISABLE_COMPILE": "1", **env},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_import_tgem_sets_passive_omp_waiting_unless_set_or_opted_out():
    """The one change ``import tgem`` makes to the process (docs/install.rst)."""
    assert _environment_after_import() == "PASSIVE"
    assert _environment_after_import(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _environment_after_import(TGEM_SET_OMP_WAIT_POLICY="0") == "<unset>"
    assert _environment_after_import(TGEM_SET_OMP_WAIT_POLICY="1") == "PASSIVE"


def test_old_paths_of_the_split_estimator_and_model_file_resolve():
    """Pickles name tgem._classifier.TGEMClassifier and tgem._training.TrainState; tests,
    benchmarks and users import a few private names from tgem._classifier and tgem._io."""
    import pickle

    import tgem
    import tgem._classifier as old_classifier
    import tgem._io as old_io
    from tgem import _inputs, _io_format, _io_read
    from tgem._training import TrainState

    assert old_classifier.TGEMClassifier is tgem.TGEMClassifier
    assert old_classifier.input_statistics is _inputs.input_statistics
    assert old_classifier.MAX_TOTAL_WEIGHT == _inputs.MAX_TOTAL_WEIGHT
    assert old_classifier.MAX_ABS_VALUE == 1e15
    assert old_io.MAX_FILE_SIZE == _io_read.MAX_FILE_SIZE
    assert old_io.MAX_HEADER_SIZE == _io_format.MAX_HEADER_SIZE
    assert old_io._digest is _io_format._digest
    assert old_io.load is tgem.load
    assert pickle.loads(pickle.dumps(TrainState())) == TrainState()
