"""The README and the documentation site stay true to the code.

- the site builds with ``mkdocs build --strict``: a broken link between pages, a missing anchor or an API
  name that no longer exists fails it (mkdocs is in the ``dev`` extra: a missing docs tool fails, it is
  never skipped);
- the README stays a user's page: at most 200 lines, with the two set-up commands in a bash block;
- every ``allocsearch <command>`` the README's code blocks name is a real command (its ``--help`` exits 0);
- every module the API reference renders (``::: module`` in docs/api.md) imports.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API_PAGE = ROOT / "docs" / "api.md"
README_MAX_LINES = 200

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
# `allocsearch start`, `python3 -m allocsearch status`; not `allocsearch-runs/`, `allocsearch.preset`, `--help`
_COMMAND = re.compile(r"(?<![\w./-])allocsearch[ \t]+([a-z][a-z0-9_-]*)")
_NOT_SHELL = {"python", "py", "yaml", "yml", "json", "toml"}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]


def readme_commands(text: str) -> list[str]:
    """The distinct first words after ``allocsearch`` in the shell and console blocks, in order."""
    seen: list[str] = []
    for lang, body in code_blocks(text):
        if lang in _NOT_SHELL:
            continue
        for line in body.splitlines():
            line = line.split("#", 1)[0]  # a comment may mention anything
            for word in _COMMAND.findall(line):
                if word not in seen:
                    seen.append(word)
    return seen


def api_modules(text: str) -> list[str]:
    return re.findall(r"^:::\s*([\w.]+)\s*$", text, re.M)


def test_site_builds_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_readme_is_short_and_has_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    bash = [body for lang, body in code_blocks(text) if lang == "bash"]
    starts = [line.strip() for body in bash for line in body.splitlines()]
    for command in ("make demo", "make test"):
        assert any(re.match(rf"{re.escape(command)}(\s|$)", s) for s in starts), \
            f"README.md: no ```bash block runs `{command}`"


def test_readme_command_parser():
    text = ("```bash\nallocsearch start --budget 1h   # then allocsearch nope\npython3 -m allocsearch status\n"
            "allocsearch --help\nallocsearch bench layers | bench trial\n```\n"
            "```\nstudy demo  (allocsearch-runs/demo)\n```\n"
            "```python\nfrom allocsearch import inject\nimport allocsearch\n```\n")
    assert readme_commands(text) == ["start", "status", "bench"]


def _readme_command_words() -> list[str]:
    return readme_commands(README.read_text(encoding="utf-8"))


def test_readme_names_commands():
    assert len(_readme_command_words()) >= 5, "README.md's code blocks name fewer commands than expected"


@pytest.mark.parametrize("command", _readme_command_words())
def test_readme_commands_exist(command):
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run([sys.executable, "-m", "allocsearch", command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (f"README.md names `allocsearch {command}`, but `allocsearch {command} --help` "
                                  f"exited {proc.returncode}:\n{proc.stderr[-2000:]}")


def test_api_page_modules_import():
    modules = api_modules(API_PAGE.read_text(encoding="utf-8"))
    assert "allocsearch" in modules and len(modules) >= 5, modules
    for name in modules:
        importlib.import_module(name)  # a stale module name in the API reference fails here
