"""No function longer than about a screen outside the tests: measured over every module of the repository
(``main.py``, ``pruning/``, ``data/``, ``engine/``, ``tools/``), argparse tables aside."""
import ast
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80  # lines from ``def`` to the function's last line, docstring and comments included
PARSER_TABLE = 10  # a function with this many ``add_argument`` calls is an argparse table, not logic


def source_files() -> List[Path]:
    files = [ROOT / "main.py"]
    for folder in ("pruning", "data", "engine", "tools"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def long_functions(source: str, limit: int = LIMIT) -> List[Tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` longer than ``limit`` lines that is not an
    argparse table."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines = node.end_lineno - node.lineno + 1
        arguments = sum(isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "add_argument" for call in ast.walk(node))
        if lines > limit and arguments < PARSER_TABLE:
            found.append((node.name, lines))
    return found


def test_the_measure_finds_long_functions_and_leaves_parser_tables():
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    assert long_functions(f"def long():\n{body}") == [("long", LIMIT + 1)]
    assert long_functions(f"def short():\n{body[:-len('    x79 = 79') - 1]}") == []
    nested = f"class A:\n    def method(self):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    assert long_functions(nested) == [("method", LIMIT + 1)]
    table = "def build_parser(p):\n" + "".join(f"    p.add_argument('--o{i}')\n" for i in range(LIMIT + 5))
    assert long_functions(table) == []


def test_no_function_outside_the_tests_is_longer_than_the_limit():
    assert len(source_files()) > 40
    too_long = [f"{path.relative_to(ROOT)}:{name} ({lines} lines)" for path in source_files()
                for name, lines in long_functions(path.read_text())]
    assert too_long == [], f"functions over {LIMIT} lines: {', '.join(too_long)}"
