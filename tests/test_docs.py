"""Every `python -m awq_ref ...` command in the README and docs/ parses with today's CLI: the
subcommand exists, each option is one of its options and each value is one it accepts. The
docs drift from the code silently otherwise (a flag renamed, a choice dropped). Commands shown in
part (`python -m awq_ref ppl --reference default`) get placeholders for what they leave out.
Nothing runs: the parser alone. The tools' commands (`tools/X.py --flag ...`, in the docs and in
the tools' own docstrings) are checked more loosely: each option is one the script declares. The
Python examples parse, and every name they take from awq_ref / awq_kernels exists after the
imports the example itself makes (in a fresh interpreter), called with keywords it accepts. And
every relative link of the docs names a file that exists."""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from awq_ref.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIX = "python -m awq_ref "
# `tools/NAME.py` then options (words starting with -) and their values, on one joined line.
TOOL_COMMAND = re.compile(r"tools/([a-z_0-9]+\.py)"
                          r"((?: +--?[a-z][^ `\n]*(?: +[^-` \n#][^ `\n]*)*)+)")


def join_continuations(text: str) -> str:
    """Shell lines continued with a trailing backslash, joined into one."""
    return re.sub(r"\\\n\s*", " ", text)


def doc_commands(text: str) -> list[str]:
    """The awq_ref command lines of one markdown text: from fenced blocks (backslash
    continuations joined, one command per line) and from inline code spans (folded lines
    joined)."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL):
        for line in join_continuations(block).split("\n"):
            if PREFIX in line:
                found.append(line[line.index(PREFIX):])
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        span = " ".join(span.split())
        if span.startswith(PREFIX):
            found.append(span)
    return found


def argv_of(command: str) -> list[str]:
    """shlex words after the prefix, shell comment dropped; `[a|b]` (an optional part, one of
    several values) becomes its first value."""
    command = re.sub(r"\[([^\]|]+)(\|[^\]]*)?\]", r"\1", command[len(PREFIX):])
    return shlex.split(command, comments=True)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


COMMANDS = [(path.relative_to(ROOT).as_posix(), c) for path in DOCS
            for c in doc_commands(path.read_text(encoding="utf-8"))]


def test_the_docs_show_commands_of_every_subcommand():
    shown = {argv_of(c)[0] for _, c in COMMANDS}
    assert shown == set(subparsers(build_parser())), shown
    assert len(COMMANDS) >= 15, COMMANDS  # the extraction still finds the docs' commands


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in
                                                       enumerate(COMMANDS)])
def test_doc_command_parses(doc, command, capsys):
    argv = argv_of(command)
    sub = subparsers(build_parser())[argv[0]]
    for word in argv[1:]:  # exact names: argparse would take a prefix (--window for --windows)
        if word.startswith("--") and word.split("=")[0] not in sub._option_string_actions:
            pytest.fail(f"{doc}: `{command}`: {argv[0]} has no option {word.split('=')[0]}")
    for action in sub._actions:  # placeholders for the required options a partial command omits
        if action.required and not set(action.option_strings) & set(argv):
            argv += [action.option_strings[0], "X"]
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{doc}: `{command}` does not parse: {capsys.readouterr().err.strip()}")


def test_a_wrong_flag_in_a_doc_command_is_caught(capsys):
    (command,) = doc_commands("Run `python -m awq_ref ppl --model M --text t.txt --window 20`.")
    with pytest.raises(pytest.fail.Exception, match="ppl has no option --window$"):
        test_doc_command_parses("x.md", command, capsys)
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: extra"):
        test_doc_command_parses("x.md", "python -m awq_ref ppl --model M --text t extra", capsys)
    with pytest.raises(pytest.fail.Exception, match="invalid choice: 'int4'"):
        test_doc_command_parses("x.md", "python -m awq_ref quantize --model M --out O "
                                "--method int4", capsys)


def tool_flags(text: str) -> list[tuple[str, str]]:
    """(script, option) for every option of every `tools/X.py ...` command in `text`."""
    text = join_continuations(text)
    return [(m.group(1), flag) for m in TOOL_COMMAND.finditer(text)
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2))]


def declared(script: str) -> str:
    """The script's source and the shared protocol options it adds (baseline_protocol.py)."""
    return (ROOT / "tools" / script).read_text() + (ROOT / "tools/baseline_protocol.py").read_text()


def test_tool_commands_use_options_the_tools_declare():
    sources = DOCS + sorted((ROOT / "tools").glob("*.py"))
    flags = [(path.name, script, flag) for path in sources
             for script, flag in tool_flags(path.read_text(encoding="utf-8"))]
    assert len(flags) >= 60, flags  # the extraction still finds the docs' commands
    options_of = {script: declared(script) for _, script, _ in flags}  # each script read once
    missing = [f for f in flags if f'"{f[2]}"' not in options_of[f[1]]]
    assert not missing, missing


def test_a_tool_option_nobody_declares_is_caught():
    (pair,) = tool_flags("Run `python tools/awq_quality.py --bits 4 --evaluation-windows all`")[1:]
    assert pair == ("awq_quality.py", "--evaluation-windows")
    assert f'"{pair[1]}"' not in declared(pair[0])


def test_relative_links_name_files_that_exist():
    pages = DOCS + [ROOT / "awq_kernels/NOTES.md", ROOT / "docs/gpu/HISTORY.md"]
    links = [(page, target) for page in pages
             for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text(encoding="utf-8"))
             if not target.startswith(("http://", "https://", "mailto:"))]
    assert len(links) >= 30, links
    broken = [(page.relative_to(ROOT).as_posix(), t) for page, t in links
              if not (page.parent / t).exists()]
    assert not broken, broken


# Run in a fresh interpreter per page: only the examples' own imports, then every attribute
# chain rooted at a name they bound is resolved with getattr (a submodule the examples did not
# import is missing, as it would be for the reader), and calls are checked against signatures.
RESOLVE = """
import ast, importlib, inspect, json, sys
tree = ast.parse(sys.stdin.read())
names, errors = {}, []
for node in ast.walk(tree):
    if isinstance(node, ast.Import):
        for a in node.names:
            top = a.name.split(".")[0]
            if top in ("awq_ref", "awq_kernels"):  # `import a.b` binds a; `import a.b as c`, a.b
                module = importlib.import_module(a.name)
                names[a.asname or top] = module if a.asname else importlib.import_module(top)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            "awq_ref", "awq_kernels"):
        module = importlib.import_module(node.module)
        for a in node.names:
            if not hasattr(module, a.name):
                errors.append(f"from {node.module} import {a.name}: no such name")
            else:
                names[a.asname or a.name] = getattr(module, a.name)
def resolve(expr):
    if isinstance(expr, ast.Name):
        if expr.id in ("awq_ref", "awq_kernels") and expr.id not in names:
            errors.append(f"{expr.id}: used but not imported")
        return names.get(expr.id, None), expr.id
    if isinstance(expr, ast.Attribute):
        obj, text = resolve(expr.value)
        if obj is None:
            return None, None
        text = f"{text}.{expr.attr}"
        if not hasattr(obj, expr.attr):
            errors.append(f"{text}: no such attribute")
            return None, None
        return getattr(obj, expr.attr), text
    return None, None
for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
        resolve(node)
    if isinstance(node, ast.Call):
        fn, text = resolve(node.func)
        if fn is None or not callable(fn):
            continue
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        for kw in node.keywords:
            if kw.arg is not None and kw.arg not in params:
                errors.append(f"{text}(): no keyword {kw.arg}")
print(json.dumps(sorted(set(errors))))
"""

# A page's examples run on from one another (the second uses the first's imports): one program.
EXAMPLES = [(path.relative_to(ROOT).as_posix(), "".join(blocks)) for path in DOCS
            if (blocks := re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"),
                                     re.DOTALL))]


def example_errors(source: str) -> list[str]:
    ast.parse(source)
    done = subprocess.run([sys.executable, "-c", RESOLVE], input=source, capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("doc, source", EXAMPLES, ids=[f"{d}:{i}" for i, (d, _) in
                                                      enumerate(EXAMPLES)])
def test_python_examples_name_what_exists(doc, source):
    assert not example_errors(source), doc


def test_a_python_example_with_a_stale_name_is_caught():
    assert len(EXAMPLES) == 3  # README, quantize-your-model, serving
    assert example_errors("import awq_kernels\nawq_kernels.ops.rms_norm") == [
        "awq_kernels.ops: no such attribute"]  # the reader's interpreter has not imported it
    assert example_errors("import awq_kernels.ops\nawq_kernels.ops") == []
    assert example_errors("awq_ref.quantize") == ["awq_ref: used but not imported"]
    assert example_errors("import awq_ref\nawq_ref.save_quantized(m, path, safe=True)\n"
                          "from awq_ref.loaders import load_modle") == [
        "awq_ref.save_quantized(): no keyword safe",
        "from awq_ref.loaders import load_modle: no such name"]
