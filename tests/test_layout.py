"""The package's layering: no import circles, and every module imports only from its own layer or the ones below.

Imports inside functions count too: a circle hidden in a function is still a circle in the design."""

import ast
from pathlib import Path

import shortcut

PACKAGE = Path(shortcut.__file__).parent

# Lowest first: the pipeline (prepare -> corpus/data -> model -> costs -> train -> evaluate -> compare/sample -> cli)
# with the small services every stage uses below it.
LAYERS = [
    ["config"],
    ["diskio", "download", "runtime", "rundir", "tracking", "scaling", "stop"],
    ["corpus", "data"],
    ["prepare"],
    ["attention", "blocks", "routing", "variants", "model"],
    ["costs"],
    ["train"],
    ["scoring", "evaluate", "audit", "report", "early_exit", "generate", "adaptive", "robustness"],
    ["sample", "compare", "compare_adaptive", "robustness_table"],
    ["cli", "launch", "__main__"],
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        found[name or "__init__"] = path
    return found


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (by name relative to the package)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "shortcut":
                base = node.module.removeprefix("shortcut").lstrip(".")
                targets = [f"{base}.{a.name}".lstrip(".") for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("shortcut").lstrip(".") for a in node.names
                           if a.name.split(".")[0] == "shortcut"]
            for t in targets:
                if t in mods and t != name:
                    deps.add(t)
                    break
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != "__init__" and not any(m.split(".")[0] in n for n in LAYERS)]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_no_import_circles():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_modules_import_only_from_their_layer_or_below():
    wrong = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
             for m, deps in imports().items() if m != "__init__" for d in deps if layer_of(d) > layer_of(m)]
    assert not wrong, wrong


def test_the_layout_check_sees_imports_inside_functions(tmp_path):
    """The walk reads function bodies (a lazy import is an import): evaluate's audit import is one of them."""
    assert "audit" in imports()["evaluate"]


BLOCK_INTERNALS = {"ln_1", "ln_2", "attn", "mlp", "c_attn", "c_proj", "shortcut_attn", "depth_attn", "wpe", "wte",
                   "rotary", "feature_maps", "depth_emb", "lm_head", "ln_f"}


def test_policies_hold_no_block_arithmetic():
    """Decoding and early exits are policies around GPT's one pass (issue 20): they never reach into a block's
    norms, attention or MLP, nor the embeddings, so a new kind of block needs no change there."""
    for name in ("generate", "early_exit", "sample"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        touched = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & BLOCK_INTERNALS)
        assert not touched, f"shortcut/{name}.py reaches into {touched}"


MAX_FUNCTION_LINES = 60


def test_no_function_is_over_60_lines():
    """A function longer than a screen is split into named steps that read top to bottom (issue 20). Counted from
    its `def` to its last line, the functions nested in it included."""
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split these into named steps: {long}"
