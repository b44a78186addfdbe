"""The docs: the configuration reference is what its generator writes from the config dataclasses, every config key
is on it with its default and docstring, the README stays a short front door, and the MkDocs site builds in strict
mode (a broken link, a missing anchor or a page left out of the navigation fails it)."""

import ast
import dataclasses
import difflib
import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
import typing

import pytest

from distrain.config import Config

from conftest import REPO

GENERATOR = REPO / "docs" / "gen_config_reference.py"
REFERENCE = REPO / "docs" / "configuration.md"
README = REPO / "README.md"
QUICKSTART = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && accelerate launch distrain/run.py "
    "--config configs/digits.yaml",
    ". .venv/bin/activate && python -m pytest -q -n 2 --dist loadfile",
)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_what_the_generator_writes():
    expected, committed = _generator().render(), REFERENCE.read_text()
    if committed != expected:
        lines = difflib.unified_diff(committed.splitlines(True), expected.splitlines(True), "committed", "generated")
        diff = "".join(list(lines)[:40])
        pytest.fail(
            "docs/configuration.md is out of date with the config dataclasses: run "
            f"`python docs/gen_config_reference.py` and commit the page\n{diff}"
        )


def _leaf_fields(cls, prefix=""):
    """(dotted key, field, its attribute docstring or None) of every non-section field, read independently of the
    generator: the class source parsed for a string literal right after each annotated field."""
    docs = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(base))).body[0].body
        for stmt, after in zip(body, body[1:]):
            literal = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and literal:
                if isinstance(after.value.value, str):
                    docs[stmt.target.id] = after.value.value
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, docs.get(f.name)


def _plain(text):
    """A table row as prose: escapes undone, code markup and runs of spaces dropped."""
    text = html.unescape(text.replace("\\|", "|"))
    return " ".join(re.sub(r"</?code>|`", "", text).split())


def test_every_config_key_is_documented_with_its_default_and_docstring():
    rows = {}
    for line in REFERENCE.read_text().splitlines():
        found = re.match(r"\| `([\w.]+)` \|", line)
        if found:
            rows[found.group(1)] = _plain(line)
    missing_doc, problems = [], []
    keys = list(_leaf_fields(Config))
    assert len(keys) > 100  # the whole tree was walked
    for key, f, doc in keys:
        if not doc or not doc.strip():
            missing_doc.append(key)
            continue
        if key not in rows:
            problems.append(f"{key}: not in docs/configuration.md")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        first_line = " ".join(inspect.cleandoc(doc).splitlines()[0].split())
        if _plain(repr(default)) not in rows[key]:
            problems.append(f"{key}: default {default!r} not in its row")
        if _plain(first_line) not in rows[key]:
            problems.append(f"{key}: docstring's first line {first_line!r} not in its row")
    assert not missing_doc, f"config fields without a docstring (a string literal right after the field): {missing_doc}"
    assert not problems, "run `python docs/gen_config_reference.py`:\n" + "\n".join(problems)
    assert set(rows) == {key for key, _, _ in keys}, "keys on the page that the config does not have"


def test_readme_is_a_short_front_door_with_the_quickstart_and_valid_links():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, f"README.md has {len(text.splitlines())} lines; move detail to docs/"
    for command in QUICKSTART:
        assert command in text.splitlines(), f"the quickstart command is not in README.md as is: {command}"
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert any(t.startswith("docs/") for t in local)
    assert [t for t in local if not (REPO / t).exists()] == []


def test_mkdocs_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    command = ["mkdocs", "build", "--strict", "-q", "-f", str(REPO / "mkdocs.yml"), "-d", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # no end-of-life banner in the output
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "configuration" / "index.html").is_file()
