#!/usr/bin/env python
"""Run the commands and snippets of README.md and docs/ as a user copies them.

Every fenced ```bash, ```sh and ```python block of README.md and docs/**/*.md (but the generated
docs/benchmarks/) runs, page by page, in a fresh temporary folder outside the repository, and any
error fails the page. A page's blocks run in order, so later blocks may use the files and names
earlier ones made: its Python blocks share one namespace; `calicache ...` and `python -m calicache ...`
commands run in this process through `calicache.cli.main` (what the installed `calicache` runs,
without a Python start-up per command); `python -c CODE` runs CODE in a namespace of its own; other
shell lines (`torchrun`, pipes) run with bash. Everything runs on one torch thread unless a command
asks for more.

An HTML comment on the line right above a block (not shown on rendered pages) steers it:

    <!-- doc-run: skip (why) -->
        not run: downloads, real weights, hours of CPU, files only the reader has. A reason is required.
    <!-- doc-run: reduce --num 4 --steps 4 -->
        a smaller run of the same commands: each flag replaces that flag's value in every calicache
        command of the block that has it, and is added to those that take it but lack it.
    <!-- doc-run: reduce num=4 steps=8 -->
        the same for a Python block: every keyword argument `num=...` written in it becomes `num=4`.

Setup (`bash scripts/setup.sh`) and the test suite (`python -m pytest`), of which this check is a
part, are never run. A block in another language (or none) that starts like a command is an error:
label it bash so it runs, or mark it skipped.

    python scripts/check_docs.py                    # every page (CI runs it through tests/test_docs.py)
    python scripts/check_docs.py docs/sampling.md -v
    python scripts/check_docs.py --list             # what would run, reduced, or be skipped
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_LANGS = {"bash": "shell", "sh": "shell", "python": "python"}
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-run:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
# Commands a reader runs once by hand; this check never runs them.
NOT_RUN = {("bash", "scripts/setup.sh"): "setup", ("python", "-m", "pytest"): "the test suite this check is part of"}
LOOKS_LIKE_COMMAND = re.compile(r"^(calicache|python|torchrun|bash|pip)\s")
SUBPROCESS_TIMEOUT = 600


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None = None
    reduce: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"


class DocError(ValueError):
    """A page that this check cannot run as written (a malformed directive, an unlabelled command)."""


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


GENERATED = ("docs/benchmarks",)  # outputs of benchmark runs (their command lines are records, not instructions)


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/ but the generated ones, in a stable order."""
    docs = sorted(p for p in (root / "docs").rglob("*.md")
                  if not any(str(p.relative_to(root)).startswith(g + "/") for g in GENERATED))
    return [root / "README.md", *docs]


def _directives(lines: list[str], fence_index: int, where: str) -> tuple[str | None, list[str]]:
    skip, reduce = None, []
    i = fence_index - 1
    while i >= 0 and (m := DIRECTIVE.match(lines[i])):
        body = m.group("body")
        word, _, rest = body.partition(" ")
        if word == "skip":
            reason = rest.strip()
            if not (reason.startswith("(") and reason.endswith(")") and len(reason) > 2):
                raise DocError(f"{where}: `doc-run: skip` needs a reason in parentheses, e.g. "
                               "`<!-- doc-run: skip (downloads DiT-XL/2 weights) -->`")
            skip = reason[1:-1]
        elif word == "reduce":
            tokens = shlex.split(rest)
            if not tokens or not (tokens[0].startswith("--") or "=" in tokens[0]):
                raise DocError(f"{where}: `doc-run: reduce` takes flags with their values (`--num 4 --steps 4`) "
                               "or, for Python, keyword arguments (`num=4 steps=8`)")
            reduce = tokens + reduce
        else:
            raise DocError(f"{where}: unknown directive `doc-run: {body}`; use `skip (why)` or `reduce --flag value`")
        i -= 1
    return skip, reduce


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page with their directives; unlabelled commands are an error."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group("lang")
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        if i == len(lines):
            raise DocError(f"{_rel(page)}:{start + 1}: code block is never closed")
        text = "\n".join(lines[start + 1 : i])
        i += 1
        where = f"{_rel(page)}:{start + 1}"
        skip, reduce = _directives(lines, start, where)
        if lang not in RUN_LANGS:
            first = next((s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")), "")
            if LOOKS_LIKE_COMMAND.match(first) and skip is None:
                raise DocError(f"{where}: a ```{lang} block holds a command ({first[:40]!r}): label it ```bash so "
                               "this check runs it, or mark it `<!-- doc-run: skip (why) -->`")
            continue
        out.append(Block(page, start + 1, lang, text, skip, reduce))
    return out


def shell_lines(text: str) -> list[str]:
    """Logical lines of a shell block: continuations joined, comment-only and blank lines dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        line = (current + raw).strip()
        current = ""
        if line and not line.startswith("#"):
            out.append(line)
    if current.strip():
        out.append(current.strip())
    return out


def calicache_argv_start(tokens: list[str]) -> int | None:
    """Index where calicache's own arguments begin in a command line, or None if it is not one."""
    if tokens[:1] == ["calicache"]:
        start = 1
    else:
        try:
            m = next(i for i in range(len(tokens) - 1) if tokens[i] == "-m" and tokens[i + 1] == "calicache")
        except StopIteration:
            return None
        start = m + 2
    return start + 1 if tokens[start : start + 1] == ["--"] else start


_SUBPARSERS: dict[str, argparse.ArgumentParser] = {}


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """calicache's subcommand name -> its argparse parser."""
    if not _SUBPARSERS:
        from calicache.cli import build_parser

        parser = build_parser()
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        _SUBPARSERS.update(action.choices)
    return _SUBPARSERS


def _flag_pairs(flags: list[str]) -> list[tuple[str, str | None]]:
    pairs, i = [], 0
    while i < len(flags):
        if not flags[i].startswith("--"):
            raise DocError(f"reduce: {flags[i]!r} is not a flag; write `--flag value` pairs or `--switch`")
        value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else None
        pairs.append((flags[i], value))
        i += 1 if value is None else 2
    return pairs


def reduce_argv(argv: list[str], flags: list[str]) -> tuple[list[str], set[str]]:
    """calicache arguments with `flags` applied (see the module docstring) and the flags that applied."""
    parsers = subcommand_parsers()
    parser = parsers.get(argv[0]) if argv else None
    if parser is None:
        return list(argv), set()
    takes = parser._option_string_actions
    out, used = list(argv), set()
    for flag, value in _flag_pairs(flags):
        hits = [i for i, tok in enumerate(out) if tok == flag or tok.startswith(flag + "=")]
        if hits:
            used.add(flag)
            for i in hits:
                if value is None:
                    continue
                if out[i] == flag:
                    out[i + 1] = value
                else:
                    out[i] = f"{flag}={value}"
        elif flag in takes:
            used.add(flag)
            out += [flag] if value is None else [flag, value]
    return out, used


@dataclass
class Step:
    """One thing to run: a calicache command in this process, a shell line, or Python source."""

    kind: str  # "cli", "shell", "python", "python-c", "not-run"
    what: str
    argv: list[str] = field(default_factory=list)


def reduce_python(source: str, assignments: list[str], where: str) -> str:
    """Every keyword argument `name=literal` of the source set to the reduced value."""
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise DocError(f"{where}: Python blocks are reduced with keyword arguments (`num=4`), got {item!r}")
        source, n = re.subn(rf"(?<![\w.]){name}=(?!=)[^,)\s]+", f"{name}={value}", source)
        if n == 0:
            raise DocError(f"{where}: reduce {item!r}: the block passes no `{name}=` argument")
    return source


def plan(block: Block) -> list[Step]:
    """What running a block means, with its reductions applied."""
    if block.lang == "python":
        return [Step("python", reduce_python(block.text, block.reduce, block.where))]
    steps: list[Step] = []
    applied: set[str] = set()
    for line in shell_lines(block.text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        tokens = list(lexer)
        if any(t != "&&" and set(t) <= set("|;<>&()") for t in tokens) or any("$" in t or "`" in t for t in tokens):
            steps.append(Step("shell", line))  # pipes, redirections, variables: bash runs the line as written
            continue
        segments = [[]]
        for tok in tokens:
            if tok == "&&":
                segments.append([])
            else:
                segments[-1].append(tok)
        for seg in segments:
            reason = next((r for cmd, r in NOT_RUN.items() if tuple(seg[: len(cmd)]) == cmd), None)
            if reason is not None:
                steps.append(Step("not-run", f"{shlex.join(seg)}  ({reason})"))
                continue
            start = calicache_argv_start(seg)
            if len(seg) == 3 and seg[:2] == ["python", "-c"]:  # its own namespace, as its own process
                steps.append(Step("python-c", seg[2]))
                continue
            if start is None:
                steps.append(Step("shell", shlex.join(seg)))
                continue
            argv, used = reduce_argv(seg[start:], block.reduce)
            applied |= used
            if seg[:start] in (["calicache"], ["python", "-m", "calicache"], ["python", "-m", "calicache", "--"]):
                steps.append(Step("cli", shlex.join(["calicache", *argv]), argv))
            else:
                steps.append(Step("shell", shlex.join(seg[:start] + argv)))
    unused = [f for f, _ in _flag_pairs(block.reduce) if f not in applied]
    if unused:
        raise DocError(f"{block.where}: reduce flags {unused} fit no calicache command of the block")
    return steps


@dataclass
class Failure:
    block: Block
    what: str
    output: str

    def __str__(self) -> str:
        tail = "\n".join(self.output.strip().splitlines()[-25:])
        return f"{self.block.where}: `{self.what[:300]}` failed:\n{tail}"


def _subprocess_env(folder: Path) -> dict[str, str]:
    import calicache

    env = dict(os.environ)
    src = str(Path(calicache.__file__).resolve().parents[1])  # the calicache this process runs
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # torchrun's default port 29500 would collide with any other job on the machine doing the same
    env.setdefault("PET_MASTER_PORT", str(_free_port()))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(argv: list[str]) -> tuple[bool, str]:
    from calicache.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - any error fails the block, reported with its traceback
            traceback.print_exc(file=buf)
            rc = 1
    return rc == 0, buf.getvalue()


def _run_python(source: str, namespace: dict, where: str) -> tuple[bool, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            exec(compile(source, where, "exec"), namespace)  # noqa: S102 - running the docs is the point
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=buf)
            return False, buf.getvalue()
    return True, buf.getvalue()


def _run_shell(line: str, folder: Path) -> tuple[bool, str]:
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=folder, env=_subprocess_env(folder),
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return False, f"timed out after {SUBPROCESS_TIMEOUT} s\n{e.stdout or ''}{e.stderr or ''}"
    return proc.returncode == 0, proc.stdout + proc.stderr


@contextlib.contextmanager
def _page_folder(keep: bool = False):
    """A fresh folder outside the repository as the working directory, with this process's global
    state (cwd, environment, torch threads and RNG) put back afterwards. Commands run on one torch
thread unless they ask for more (`--threads`)."""
    import random

    import numpy as np
    import torch

    folder = Path(tempfile.mkdtemp(prefix="calicache-docs-"))
    if ROOT in folder.resolve().parents:
        raise RuntimeError(f"the temporary folder {folder} is inside the repository; set TMPDIR elsewhere")
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    threads, rngs = torch.get_num_threads(), (torch.get_rng_state(), np.random.get_state(), random.getstate())
    os.environ.update({"CALICACHE_CACHE": str(folder / ".cache"), "CALICACHE_HOME": str(folder / ".home"),
                       "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)  # tiny models: a second thread buys little, and on a shared machine it costs a lot
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        torch.set_num_threads(threads)
        torch.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def run_page(page: Path, log=None, keep: bool = False) -> list[Failure]:
    """Run a page's blocks in order in one fresh folder; stop at the first failure (later blocks
    usually need what it would have made)."""
    todo = blocks(page)
    planned = [(b, [] if b.skip else plan(b)) for b in todo]  # malformed directives fail before any work
    namespace: dict = {"__name__": "__docs__"}
    with _page_folder(keep) as folder:
        if log and keep:
            log(f"{_rel(page)}: running in {folder}")
        for block, steps in planned:
            if block.skip:
                if log:
                    log(f"{block.where}: skipped ({block.skip})")
                continue
            for step in steps:
                t0 = time.perf_counter()
                if step.kind == "not-run":
                    ok, out = True, ""
                elif step.kind == "cli":
                    ok, out = _run_cli(step.argv)
                elif step.kind == "python":
                    ok, out = _run_python(step.what, namespace, block.where)
                elif step.kind == "python-c":
                    ok, out = _run_python(step.what, {"__name__": "__main__"}, f"{block.where} (python -c)")
                else:
                    ok, out = _run_shell(step.what, folder)
                if log:
                    label = "not run" if step.kind == "not-run" else f"{time.perf_counter() - t0:6.1f} s"
                    log(f"{block.where}: {label}  {step.what.splitlines()[0][:110]}")
                if not ok:
                    return [Failure(block, step.what, out)]
    return []


def describe(page: Path) -> list[str]:
    out = []
    for b in blocks(page):
        if b.skip:
            out.append(f"{b.where}: skip ({b.skip})")
            continue
        for step in plan(b):
            first = step.what.splitlines()[0]
            out.append(f"{b.where}: {step.kind:8s} {first[:120]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="pages to run (default: README.md and docs/**/*.md)")
    parser.add_argument("--list", action="store_true", help="print what would run, without running it")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (their paths are printed)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every command with its time")
    args = parser.parse_args(argv)
    todo = [Path(p).resolve() for p in args.pages] or pages()
    if args.list:
        for page in todo:
            print("\n".join(describe(page)))
        return 0
    log = (lambda s: print(s, flush=True)) if args.verbose or args.keep else None
    failures, t0 = [], time.perf_counter()
    for page in todo:
        t = time.perf_counter()
        found = run_page(page, log, args.keep)
        failures += found
        print(f"{'FAIL' if found else 'ok  '} {_rel(page)} ({time.perf_counter() - t:.1f} s)", flush=True)
    for f in failures:
        print(f"\n{f}", file=sys.stderr)
    print(f"{len(todo) - len(failures)}/{len(todo)} pages ran as written in {time.perf_counter() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
