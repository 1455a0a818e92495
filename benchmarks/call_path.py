"""Which of the package's modules one cell passes through in ``transcriptformer inference`` and ``perturb``.

Runs each command in-process on a single real cell with a profiler hook that records each call from one package
module into another: ``inference`` with all outputs (so that every head and the per-gene mapping run), ``perturb``
with one knock-out (the cell's most expressed gene of the vocabulary), each in a process of its own (so that
nothing one command loaded or cached shortens the other's path). Prints, per command, the modules in order of
first use with their layer, the module-to-module edges, and the calls that go from a lower layer to a higher one
(a lower layer calling back into a higher one, which the layered design avoids). It also counts, over the whole
package's source, the imports of a module of a higher layer (at any depth, lazy imports included).

    python benchmarks/call_path.py                       # this checkout, both commands
    python benchmarks/call_path.py --command perturb     # one of them
    python benchmarks/call_path.py --src OTHER/src       # another checkout of the package (e.g. an older commit)
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np

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


def trace_command(argv: list[str]) -> list[tuple[str, str]]:
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
        raise SystemExit(f"{argv[0]} failed with exit code {code}")
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


def most_expressed_known_gene(cell: ad.AnnData, checkpoint: Path) -> str:
    """The Ensembl id of the cell's most expressed gene that the checkpoint's vocabulary holds."""
    (table,) = (checkpoint / "vocabs").glob("*_gene.h5")
    with h5py.File(table) as f:
        known = set(f["keys"][:].astype(str))
    counts = np.asarray(cell.X.todense() if hasattr(cell.X, "todense") else cell.X).ravel()
    ids = cell.var["ensembl_id"].to_numpy().astype(str)
    return next(ids[i] for i in np.argsort(-counts, kind="stable") if counts[i] > 0 and ids[i] in known)


def command_lines(command: str, checkpoint: Path, one_cell: Path, cell: ad.AnnData, output: str) -> list[str]:
    """The argv of ``command`` on the one cell."""
    run = ["--checkpoint-path", str(checkpoint), "--data-file", str(one_cell), "--output-path", output]
    if command == "inference":
        return ["inference", *run, "--output-keys", "embeddings", "llh", "gene_llh", "mu", "cge"]
    return ["perturb", *run, "--knock-out", most_expressed_known_gene(cell, checkpoint)]


def report_path(command: str, edges: list[tuple[str, str]]) -> None:
    """Modules in order of first use, distinct edges, and the calls from a lower layer into a higher one."""
    order: list[str] = []
    for caller, callee in edges:
        for module in (caller, callee):
            if module not in order:
                order.append(module)
    distinct = list(dict.fromkeys(edges))
    upward = [(a, b) for a, b in distinct if layer_of(a) >= 0 and layer_of(b) > layer_of(a)]
    print(f"{command}: modules passed: {len(order)}")
    for module in order:
        print(f"  L{layer_of(module)}  {module}")
    print(f"{command}: distinct module-to-module call edges: {len(distinct)}")
    print(f"{command}: calls from a lower layer into a higher one: {len(upward)}")
    for caller, callee in upward:
        print(f"  {caller} (L{layer_of(caller)}) -> {callee} (L{layer_of(callee)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the package's source folder")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "test" / "data", help="checkpoint and cells")
    parser.add_argument("--command", choices=["inference", "perturb", "both"], default="both", help="what to trace")
    parser.add_argument("--no-imports", action="store_true", help="leave out the count of imports of a higher layer")
    args = parser.parse_args()

    if args.command == "both":  # each command in a process of its own
        for command in ("inference", "perturb"):
            folders = ["--src", str(args.src), "--data-dir", str(args.data_dir)]
            subprocess.run([sys.executable, __file__, "--command", command, *folders, "--no-imports"], check=True)
    else:
        sys.path.insert(0, str(args.src))
        checkpoint = args.data_dir / "reference_tiny"
        with tempfile.TemporaryDirectory() as tmp:
            cell = ad.read_h5ad(checkpoint / "input.h5ad")[:1].copy()
            one_cell = Path(tmp) / "one_cell.h5ad"
            cell.write_h5ad(one_cell)
            argv = command_lines(args.command, checkpoint, one_cell, cell, str(Path(tmp) / "output"))
            report_path(args.command, trace_command(argv))
    if args.no_imports:
        return
    imports = upward_imports(args.src)
    print(f"imports of a higher layer in the package's source: {len(imports)}")
    for importer, imported in imports:
        print(f"  {importer} (L{layer_of(importer)}) imports {imported} (L{layer_of(imported)})")


if __name__ == "__main__":
    main()
