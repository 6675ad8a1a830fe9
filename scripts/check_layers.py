"""Check that llmfoundry_lite's imports tell the truth: every arrow points down the layers, no cycles,
and function-local imports only at the lazy boundaries. Prints the layer table; exit 1 on a problem.

    python scripts/check_layers.py [REPOSITORY]     (run by `make test`; default: this one)

Every `import` statement in the package is read, at module level or inside a function. A
function-local import is allowed only where loading lazily is the point, and says why on its line
(`# lazy: ...`):
- an optional or heavy third-party dependency that a command may never need (OPTIONAL below);
- the public facade (`llmfoundry_lite/__init__.py`: `import llmfoundry_lite` does not load Composer)
  and the CLI's sub-command dispatch (only the chosen command's module is imported; by name);
- plug-in loading (`registry.py` imports modules by name, not by an import statement).
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent).resolve()
PACKAGE = ROOT / "llmfoundry_lite"

# Lowest first; a module may import its own layer or a lower one. A name is a module or a folder
# (`llmfoundry_lite.` omitted); the longest matching name decides.
LAYERS = [
    ("base", ["errors", "compat", "files", "stores"]),
    ("config", ["registry", "config"]),
    ("model", ["models"]),
    ("data at run time, ICL tasks", ["data", "icl"]),
    ("assembly", ["assembly"]),
    ("formats, inference, opening", ["export", "inference", "opening"]),
    ("data prep, training, eval", ["prep", "training", "eval"]),
    ("commands", ["cli", "quickstart", "quickstart_corpus", "__init__"]),
]
# Same layer, but never import each other (what both need lives below them).
APART = [("training", "eval")]
# Third-party modules a function may import lazily: optional extras and heavy libraries that only
# some commands load.
OPTIONAL = {"peft", "wandb", "mlflow", "datasets", "pyspark", "boto3", "gguf", "llama_cpp", "flash_attn",
            "torchao", "tensorboard", "jinja2", "nbformat", "nbclient", "ipywidgets", "IPython", "matplotlib",
            "composer"}  # composer: only for object stores in modules that inference commands load (stores.py)
# Modules whose llmfoundry_lite imports inside functions are the lazy boundary itself.
BOUNDARIES = {"__init__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(name: str):
    """(index, folder) of a module name (without the package prefix)."""
    best = None
    for index, (_, names) in enumerate(LAYERS):
        for n in names:
            if (name == n or name.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (index, n)
    return best


class Imports(ast.NodeVisitor):
    """Every import in one module: (target, line, function-local?)."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package, self.depth, self.found = module, is_package, 0, []

    def _scope(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            package = ("llmfoundry_lite." + self.module).split(".")
            package = package if self.is_package else package[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        # `from pkg import submodule` imports the submodule; one statement counts once per module it imports
        targets = {f"{base}.{a.name}" if base.startswith("llmfoundry_lite") and exists(f"{base}.{a.name}") else base
                   for a in node.names}
        self.found += [(target, node.lineno, self.depth > 0) for target in sorted(targets)]


def exists(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def main() -> int:
    problems, local_count = [], 0
    files = sorted(PACKAGE.rglob("*.py"))
    lines_per_folder = defaultdict(int)
    for path in files:
        module = module_name(path)
        source = path.read_text()
        text_lines = source.splitlines()
        lines_per_folder[layer_of(module)[1] if layer_of(module) else "?"] += len(text_lines)
        here = layer_of(module)
        if here is None:
            problems.append(f"{path.relative_to(ROOT)}: in no layer; add it to LAYERS in {Path(__file__).name}")
            continue
        visitor = Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(source))
        for target, line, local in visitor.found:
            where = f"{path.relative_to(ROOT)}:{line}"
            internal = target == "llmfoundry_lite" or target.startswith("llmfoundry_lite.")
            if local:
                local_count += 1
                reason = "# lazy:" in text_lines[line - 1]
                allowed = (module in BOUNDARIES) if internal else target.split(".")[0] in OPTIONAL
                if not allowed:
                    problems.append(f"{where}: function-local import of {target} is not a lazy boundary; "
                                    "import it at the top of the module")
                elif not reason:
                    problems.append(f"{where}: function-local import of {target} needs its reason on the line "
                                    "(# lazy: ...)")
            if not internal or target == "llmfoundry_lite":
                continue
            name = target[len("llmfoundry_lite."):]
            there = layer_of(name)
            if there is None:
                continue  # reported with its own file
            if there[0] > here[0]:
                problems.append(f"{where}: {module} (layer {here[0] + 1}) imports {name} (layer {there[0] + 1}), "
                                "a higher layer")
            for a, b in APART:
                if {here[1], there[1]} == {a, b}:
                    problems.append(f"{where}: {a}/ and {b}/ do not import each other")
    problems += cycles(files)

    print(f"{'layer':<6}{'name':<30}{'folders and modules':<50}{'lines':>7}")
    for index, (title, names) in enumerate(LAYERS):
        lines = sum(lines_per_folder.get(n, 0) for n in names)
        print(f"{index + 1:<6}{title:<30}{', '.join(names):<50}{lines:>7}")
    print(f"{'':<36}{'package':<50}{sum(lines_per_folder.values()):>7}")
    print(f"function-local imports: {local_count}")
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)" if problems else "imports: every arrow points down; no cycles")
    return 1 if problems else 0


def cycles(files) -> list:
    """Import cycles between modules (module-level and function-local imports alike)."""
    graph = defaultdict(set)
    for path in files:
        module = module_name(path)
        visitor = Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text()))
        for target, _, _ in visitor.found:
            if target.startswith("llmfoundry_lite.") and target[16:] != module:
                graph[module].add(target[16:])
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append("import cycle: " + " <-> ".join(sorted(component)))

    sys.setrecursionlimit(10_000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    sys.exit(main())
