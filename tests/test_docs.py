"""The documentation's commands and links point at things that exist.

For README.md, docs/*.md and results/*/README.md: every command in a shell code block (and every
inline code span that starts with `python `, `torchrun `, `bash ` or `pip install -r`) names scripts
and files that exist, and passes only options that the script's argparse parser accepts (read once
per script from its `--help`); every relative link `](path)` points to an existing file. README.md
stays under 200 lines.
"""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ([ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
             + sorted((ROOT / "results").glob("*/README.md")))
README_MAX_LINES = 200

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
FENCE_RE = re.compile(r"^(```|~~~)[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
INLINE_RE = re.compile(r"`([^`\n]+)`")
LINK_RE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
COMMAND_START = re.compile(r"^(python3?|torchrun|bash|pip3? install\s+-r)\s")
SHELL_KEYWORDS = {"do", "then", "else", "elif", "{", "(", "time", "!", "exec"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
# arguments that name files the command reads (outputs such as --out are not checked)
INPUT_PREFIXES = ("configs/", "tests/", "tools/")
HELP_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- extraction

def _strip_comment(line: str) -> str:
    """Drops a shell comment: '#' at the start of a word, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_lines(block: str) -> List[str]:
    """Logical lines of a shell block: continuations joined, prompts and comments dropped."""
    joined = re.sub(r"\\\n", " ", block)
    lines = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        line = _strip_comment(line).strip()
        if line:
            lines.append(line)
    return lines


def simple_commands(line: str) -> List[List[str]]:
    """Splits one shell line into simple commands (on ; && || |), keywords such as `do` removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: take the words as they are
        tokens = line.split()
    commands, current = [], []
    for token in tokens + [";"]:
        if token in SEPARATORS:
            if current:
                commands.append(current)
            current = []
        elif not current and (token in SHELL_KEYWORDS or re.fullmatch(r"[A-Za-z_]\w*=\S*", token)):
            continue  # `do python ...`, `FOO=1 python ...`
        else:
            current.append(token)
    return commands


def _strip_fences(text: str) -> str:
    return FENCE_RE.sub("", text)


def extract_commands(text: str) -> List[Tuple[str, List[str]]]:
    """(source line, argv) of every command worth checking in a markdown text."""
    found = []
    for match in FENCE_RE.finditer(text):
        if match.group(2).lower() not in SHELL_LANGS:
            continue
        for line in shell_lines(match.group(3)):
            for argv in simple_commands(line):
                if COMMAND_START.match(" ".join(argv) + " "):
                    found.append((line, argv))
    for match in INLINE_RE.finditer(_strip_fences(text)):
        span = match.group(1).strip()
        if COMMAND_START.match(span + " "):
            for argv in simple_commands(span):
                if COMMAND_START.match(" ".join(argv) + " "):
                    found.append((span, argv))
    return found


def extract_links(text: str) -> List[str]:
    return [m.group(1) for m in LINK_RE.finditer(_strip_fences(text))]


# ----------------------------------------------------------------------------- --help parsing

@functools.lru_cache(maxsize=None)
def help_text(help_argv: Tuple[str, ...]) -> Tuple[Optional[str], str]:
    """(help output or None, error) of `python <help_argv> --help`, run once per argv."""
    try:
        proc = subprocess.run([sys.executable, *help_argv, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=HELP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"`python {' '.join(help_argv)} --help` timed out"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"`python {' '.join(help_argv)} --help` failed (exit {proc.returncode}): {tail}"
    return proc.stdout, ""


def parse_help(text: str) -> Tuple[FrozenSet[str], FrozenSet[str]]:
    """(option strings, subcommand names) from argparse's --help output."""
    options, subcommands = set(), set()
    usage, _, _ = text.partition("\n\n")
    options.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", usage.split(":", 1)[-1]))
    for line in text.splitlines():
        if re.match(r"^  -", line):  # an option's own line: its strings come before the help text
            head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            options.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", head))
        sub = re.match(r"^  \{([\w,-]+)\}(\s|$)", line)
        if sub:
            subcommands.update(sub.group(1).split(","))
    return frozenset(options), frozenset(subcommands)


# ----------------------------------------------------------------------------- checking

def _check_path(token: str, what: str) -> Optional[str]:
    if "$" in token or "*" in token:
        return None
    path = ROOT / token.split("::")[0]
    return None if path.exists() else f"{what} {token!r} does not exist"


def _module_file(module: str) -> Optional[Path]:
    """The file of `python -m module` when module belongs to this repository, else None."""
    parts = module.split(".")
    if not (ROOT / parts[0]).is_dir() and not (ROOT / f"{parts[0]}.py").is_file():
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return base.with_suffix(".py")


def _check_options(help_argv: Tuple[str, ...], args: Sequence[str], who: str) -> List[str]:
    text, error = help_text(help_argv)
    if text is None:
        return [error]
    options, subcommands = parse_help(text)
    if subcommands:
        if args and not args[0].startswith("-"):
            if args[0] not in subcommands and "$" not in args[0]:
                return [f"{who}: unknown subcommand {args[0]!r} (has {', '.join(sorted(subcommands))})"]
            if args[0] in subcommands:
                return _check_options(help_argv + (args[0],), args[1:], f"{who} {args[0]}")
    problems = []
    for token in args:
        if token.startswith("--") and len(token) > 2:
            name = token.split("=", 1)[0]
            if name not in options:
                problems.append(f"{who}: option {name} is not accepted by its parser")
    return problems


def _check_inputs(args: Sequence[str]) -> List[str]:
    problems = []
    for token in args:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if value.startswith(INPUT_PREFIXES):
            problem = _check_path(value, "file")
            if problem:
                problems.append(problem)
    return problems


def check_command(argv: Sequence[str]) -> List[str]:
    """Problems with one simple command: missing scripts or files, options its parser refuses."""
    program, args = argv[0], list(argv[1:])
    if program.startswith("pip"):
        problems = []
        for flag, value in zip(args, args[1:]):
            if flag in ("-r", "-c", "--requirement", "--constraint"):
                problems += [p for p in [_check_path(value, "requirements file")] if p]
        return problems
    if program == "bash":
        script = next((a for a in args if not a.startswith("-")), None)
        return [p for p in [_check_path(script, "script")] if p] if script else []
    if program == "torchrun":
        index = next((i for i, a in enumerate(args) if a.endswith(".py")), None)
        if index is None:
            return ["torchrun: no training script (*.py) in the command"]
        problems = _check_options(("-m", "torch.distributed.run"), [a for a in args[:index]], "torchrun")
        script = args[index]
        missing = _check_path(script, "script")
        if missing:
            return problems + [missing]
        return (problems + _check_options((script,), args[index + 1:], script)
                + _check_inputs(args[index + 1:]))
    # python / python3
    while args and args[0] in ("-u", "-O", "-B", "-X") or (args and args[0].startswith("-W")):
        args = args[1:]
    if not args:
        return []
    if args[0] == "-c":
        return []
    if args[0] == "-m":
        if len(args) < 2:
            return ["python -m without a module"]
        module, rest = args[1], args[2:]
        path = _module_file(module)
        if path is None:  # an installed tool such as pytest or pip: check the paths it is given
            if module == "pytest":
                return [p for p in (_check_path(a, "test path") for a in rest
                                    if not a.startswith("-") and ("/" in a or a.endswith(".py"))) if p]
            return []
        if not path.is_file():
            return [f"module {module!r} does not exist in the repository ({path.relative_to(ROOT)})"]
        return _check_options(("-m", module), rest, f"python -m {module}") + _check_inputs(rest)
    script, rest = args[0], args[1:]
    missing = _check_path(script, "script")
    if missing:
        return [missing]
    return _check_options((script,), rest, script) + _check_inputs(rest)


def check_markdown(text: str, base: Path) -> List[str]:
    """Every problem in one markdown text whose relative links start from folder `base`."""
    found: Dict[str, str] = {}  # problem -> the first line showing it
    for line, argv in extract_commands(text):
        for problem in check_command(argv):
            found.setdefault(problem, line)
    problems = [f"{problem}  [in: {line}]" for problem, line in found.items()]
    for link in extract_links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I) or link.startswith("#"):
            continue  # http:, https:, mailto:, an anchor in the same page
        target = link.split("#", 1)[0]
        if not (base / target).exists():
            problems.append(f"link {link!r} points to nothing")
    return problems


def _prefetch_helps(texts: Sequence[str]) -> None:
    """Runs the top-level --help of every script the docs name, a few at a time."""
    keys = set()
    for text in texts:
        for _, argv in extract_commands(text):
            args = argv[1:]
            if argv[0].startswith("python") and args and args[0].endswith(".py") and (ROOT / args[0]).is_file():
                keys.add((args[0],))
            elif argv[0] == "torchrun":
                keys.add(("-m", "torch.distributed.run"))
                keys.update((a,) for a in args if a.endswith(".py") and (ROOT / a).is_file())
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(help_text, sorted(keys)))


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def doc_texts() -> Dict[Path, str]:
    texts = {path: path.read_text(encoding="utf-8") for path in DOC_FILES}
    _prefetch_helps(list(texts.values()))
    return texts


def test_the_doc_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in DOC_FILES}
    for page in ("README.md", "docs/library.md", "docs/cli.md", "docs/reliability.md",
                 "docs/distributed.md", "docs/visualization.md", "results/fashionmnist/README.md"):
        assert page in names


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move depth into docs/"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_commands_and_links_exist(path, doc_texts):
    problems = check_markdown(doc_texts[path], path.parent)
    assert not problems, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", DOC_FILES[1:], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_page_starts_with_what_it_covers(path, doc_texts):
    lines = doc_texts[path].lstrip("\ufeff").splitlines()
    first = lines[0].strip() if lines else ""
    assert first and not first.startswith("#") and (len(lines) < 2 or not lines[1].strip()), (
        f"{path.relative_to(ROOT)} should open with one line saying what it covers, then a blank line")


def test_the_docs_show_the_main_commands(doc_texts):
    readme = doc_texts[ROOT / "README.md"]
    commands = [" ".join(argv) for _, argv in extract_commands(readme)]
    assert "python main.py" in commands
    assert "python -m pytest -n auto" in commands
    assert any(c.startswith("pip install -r requirements.txt -c requirements-lock.txt") for c in commands)


# A synthetic page: the checker must catch each of these, and accept the good lines.
GOOD = """
```bash
python main.py --model tk --reduce_token=3   # a comment with --not_an_option
for m in tk tome; do python main.py --model $m --output_dir out/$m; done
pip install -r requirements.txt -c requirements-lock.txt
```
See [the readme](README.md) and [the license](LICENSE#top), or [the web](https://example.org/x).
"""


@pytest.mark.parametrize("page, expected", [
    ("```bash\npython main.py --model tk --made_up_option 3\n```\n", "--made_up_option"),
    ("```sh\npython main.py \\\n    --epochs 1 --also_made_up\n```\n", "--also_made_up"),
    ("```console\n$ python tools/no_such_tool.py --arch x\n```\n", "tools/no_such_tool.py"),
    ("```bash\nbash tools/no_such_script.sh\n```\n", "tools/no_such_script.sh"),
    ("```bash\ntorchrun --standalone --nproc_per_node 2 main.py --bogus_flag\n```\n", "--bogus_flag"),
    ("```bash\ntorchrun --not_a_torchrun_flag 2 main.py\n```\n", "--not_a_torchrun_flag"),
    ("```bash\npython main.py --config configs/no_such_config.yaml\n```\n", "configs/no_such_config.yaml"),
    ("```bash\npython -m pruning.no_such_module --x 1\n```\n", "pruning.no_such_module"),
    ("```bash\npip install -r no-such-requirements.txt\n```\n", "no-such-requirements.txt"),
    ("Run `python main.py --inline_made_up` to see.\n", "--inline_made_up"),
    ("See [the guide](docs/no_such_page.md).\n", "docs/no_such_page.md"),
    ("![a picture](docs/no_such_picture.png)\n", "docs/no_such_picture.png"),
])
def test_the_checker_catches_made_up_commands_and_links(page, expected):
    problems = [p.split("  [in: ")[0] for p in check_markdown(page, ROOT)]
    assert any(expected in p for p in problems), problems


def test_the_checker_accepts_real_commands_and_links():
    assert check_markdown(GOOD, ROOT) == []


def test_commands_are_split_like_a_shell():
    block = "for m in a b; do\n  python main.py --model $m \\\n    --epochs 1  # note\ndone\n"
    argvs = [argv for line in shell_lines(block) for argv in simple_commands(line)]
    assert ["python", "main.py", "--model", "$m", "--epochs", "1"] in argvs
    assert parse_help("usage: x [-h] [--a A]\n\noptions:\n  -h, --help  show\n  --b-c B, --b_c B  text --zz\n"
                      "  {one,two}\n")[0] == {"-h", "--help", "--a", "--b-c", "--b_c"}
