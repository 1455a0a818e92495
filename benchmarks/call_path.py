"""Which of the package's modules one cell passes through in ``transcriptformer inference``, and in what order.

Runs the command in-process on a single real cell (all outputs, so that every head and the per-gene mapping run)
with a profiler hook that records each call from one package module into another. Prints the modules in order of
first use with their layer, the module-to-module edges, and the calls that go from a lower layer to a higher
one (a lower layer calling back into a higher one, which the layered design avoids). It also counts, over the
whole package's source, the imports of a module of a higher layer (at any depth, lazy imports included).

    python benchmarks/call_path.py                 # this checkout
    python benchmarks/call_path.py --src OTHER/src # another checkout of the package (e.g. an older commit)
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
from pathlib import Path

import anndata as ad

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "transcriptformer"

# Layer of each module (by dotted-name prefix, longest prefix wins), bottom first: the table that
# test/test_architecture.py enforces, plus the modules of earlier layouts, so that older commits can be measured.
LEGACY_LAYERS = {"ood": 3, "esm_vocab": 4, "inference": 4, "scoring": 4}


def read_layers() -> dict[str, int]:
    """``LAYERS`` of test/test_architecture.py (read from its source, without importing the test)."""
    tree = ast.parse((ROOT / "test" / "test_architecture.py").read_text())
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "LAYERS")
    return ast.literal_eval(table) | LEGACY_LAYERS


LAYERS = read_layers()


def layer_of(module: str) -> int:
    """Layer of a module of the package (``transcriptformer.x.y``); -1 for the package's ``__init__``."""
    parts = module.split(".")[1:]
    for depth in range(len(parts), 0, -1):
        key = ".".join(parts[:depth])
        if key in LAYERS:
            return LAYERS[key]
    return -1


def trace_inference(argv: list[str]) -> list[tuple[str, str]]:
    """Run the CLI with ``argv`` and return the (caller module, callee module) of every cross-module call."""
    from transcriptformer.cli import main

    edges: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        if event != "call" or frame.f_code.co_name == "<module>":
            return
        callee = frame.f_globals.get("__name__", "")
        caller_frame = frame.f_back
        caller = caller_frame.f_globals.get("__name__", "") if caller_frame else ""
        if callee.startswith(PACKAGE) and caller.startswith(PACKAGE) and callee != caller:
            edges.append((caller, callee))

    sys.setprofile(profile)
    try:
        code = main(argv)
    finally:
        sys.setprofile(None)
    if code:
        raise SystemExit(f"inference failed with exit code {code}")
    return edges


def upward_imports(src: Path) -> list[tuple[str, str]]:
    """Every (importer, imported) pair of the package's source where the imported module is in a higher layer."""
    package = src / PACKAGE
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found = []
    for importer, path in sorted(modules.items()):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith(PACKAGE)]
            for name in names:
                while name not in modules:
                    name = name.rsplit(".", 1)[0]
                if layer_of(importer) >= 0 and layer_of(name) > layer_of(importer):
                    found.append((importer, name))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the package's source folder")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "test" / "data", help="checkpoint and cells")
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))

    with tempfile.TemporaryDirectory() as tmp:
        one_cell = Path(tmp) / "one_cell.h5ad"
        ad.read_h5ad(args.data_dir / "reference_tiny" / "input.h5ad")[:1].copy().write_h5ad(one_cell)
        argv = [
            "inference",
            "--checkpoint-path", str(args.data_dir / "reference_tiny"),
            "--data-file", str(one_cell),
            "--output-path", tmp,
            "--output-keys", "embeddings", "llh", "gene_llh", "mu", "cge",
        ]  # fmt: skip
        edges = trace_inference(argv)

    order: list[str] = []
    for caller, callee in edges:
        for module in (caller, callee):
            if module not in order:
                order.append(module)
    distinct = list(dict.fromkeys(edges))
    upward = [(a, b) for a, b in distinct if layer_of(a) >= 0 and layer_of(b) > layer_of(a)]
    print(f"modules passed: {len(order)}")
    for module in order:
        print(f"  L{layer_of(module)}  {module}")
    print(f"distinct module-to-module call edges: {len(distinct)}")
    print(f"calls from a lower layer into a higher one: {len(upward)}")
    for caller, callee in upward:
        print(f"  {caller} (L{layer_of(caller)}) -> {callee} (L{layer_of(callee)})")
    imports = upward_imports(args.src)
    print(f"imports of a higher layer in the package's source: {len(imports)}")
    for importer, imported in imports:
        print(f"  {importer} (L{layer_of(importer)}) imports {imported} (L{layer_of(imported)})")


if __name__ == "__main__":
    main()
