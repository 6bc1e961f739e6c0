"""The docs run as written (scripts/check_docs.py), and every command-line flag is documented."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_docs", ROOT / "scripts" / "check_docs.py")
check_docs = importlib.util.module_from_spec(_spec)
sys.modules["check_docs"] = check_docs  # dataclasses look their module up by name
_spec.loader.exec_module(check_docs)


@pytest.mark.parametrize("page", check_docs.pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs_as_written(page: Path) -> None:
    failures = check_docs.run_page(page)
    assert not failures, "\n\n".join(map(str, failures))


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


def test_directives_and_reductions(tmp_path: Path) -> None:
    page = _page(tmp_path, (
        "<!-- doc-run: reduce --num 4 --steps 3 --json -->\n```bash\n"
        "# a comment\ncalicache sample --num 64 --out a && calicache macs --model DiT-XL/2 \\\n    --steps=20\n```\n"
        "<!-- doc-run: skip (downloads) -->\n```sh\ncalicache sample --model DiT-XL/2\n```\n"
        "<!-- doc-run: reduce num=2 -->\n```python\nx = f(num=16, steps=20)\ny = g(enum=3)\n```\n"
        "```text\nout = F_prev\n```\n"
    ))
    run, skipped, python = check_docs.blocks(page)
    assert skipped.skip == "downloads" and skipped.line == 8
    steps = check_docs.plan(run)
    # replaced where present (also --flag=value), added where the command takes the flag, left out elsewhere
    assert [s.argv for s in steps] == [["sample", "--num", "4", "--out", "a", "--steps", "3", "--json"],
                                       ["macs", "--model", "DiT-XL/2", "--steps=3", "--json"]]
    assert check_docs.plan(python)[0].what == "x = f(num=2, steps=20)\ny = g(enum=3)"


@pytest.mark.parametrize("text, message", [
    ("```\ncalicache demo\n```\n", "label it ```bash"),
    ("<!-- doc-run: skip -->\n```bash\ncalicache demo\n```\n", "needs a reason"),
    ("<!-- doc-run: shrink -->\n```bash\ncalicache demo\n```\n", "unknown directive"),
    ("<!-- doc-run: reduce --epochs 1 -->\n```bash\ncalicache demo\n```\n", "fit no calicache command"),
    ("<!-- doc-run: reduce num=1 -->\n```python\nx = 1\n```\n", "passes no `num=` argument"),
])
def test_bad_pages_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(check_docs.DocError, match=re.escape(message)):
        for block in check_docs.blocks(_page(tmp_path, text)):
            check_docs.plan(block)


def test_a_failing_block_fails_its_page(tmp_path: Path) -> None:
    page = _page(tmp_path, "```python\nimport os\nopen('made.txt', 'w').write(os.getcwd())\n```\n"
                           "```bash\ncalicache sample --model no-such-model.pt --out x\n```\n"
                           "```python\nraise AssertionError('not reached')\n```\n")
    failures = check_docs.run_page(page)
    assert len(failures) == 1 and failures[0].block.line == 5 and "no-such-model.pt" in failures[0].output
    assert not (tmp_path / "made.txt").exists()  # blocks run in a fresh folder, not beside the page


def _command_pages() -> dict[str, set[Path]]:
    """README's command table: subcommand -> the pages its row links, and the pages those link."""
    out: dict[str, set[Path]] = {}
    for row in (ROOT / "README.md").read_text().splitlines():
        if not row.startswith("| `calicache"):
            continue
        first = row.split("|")[1]
        names = [n.removeprefix("calicache ") for n in re.findall(r"`([^`]+)`", first)]
        linked = {(ROOT / link).resolve() for link in re.findall(r"\]\(([^)#]+\.md)", row)}
        for page in list(linked):
            linked |= {(page.parent / link).resolve() for link in re.findall(r"\]\(([^)#]+\.md)", page.read_text())}
        for name in names:
            out.setdefault(name, set()).update(p for p in linked if p.exists())
    return out


def test_every_flag_of_every_command_is_documented() -> None:
    """A flag of `calicache X` must be named in the pages README's command table gives for X (or in a
    page they link), so that a new flag cannot land without its documentation."""
    documented = _command_pages()
    parsers = check_docs.subcommand_parsers()
    missing_rows = sorted(set(parsers) - set(documented))
    assert not missing_rows, f"README.md's command table has no row (with its docs page) for {missing_rows}"
    missing = []
    for name, parser in parsers.items():
        text = "\n".join(p.read_text() for p in documented[name])
        for flag in parser._option_string_actions:
            if flag.startswith("--") and flag != "--help" and not re.search(re.escape(flag) + r"(?![\w-])", text):
                missing.append(f"calicache {name} {flag}")
    assert not missing, "flags not in their command's docs (README's table says which page): " + ", ".join(missing)


def test_shell_syntax_runs_in_bash(tmp_path: Path) -> None:
    page = _page(tmp_path, "```bash\necho a | tr a b > out.txt\npython -c \"print(1); print(2)\"\n"
                           "test -s out.txt\n```\n")
    (block,) = check_docs.blocks(page)
    assert [s.kind for s in check_docs.plan(block)] == ["shell", "python-c", "shell"]
    assert check_docs.run_page(page) == []
