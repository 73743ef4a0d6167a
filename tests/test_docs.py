"""The README stays a short guide with the two commands; docs links resolve; no measured
figure is lost or changed on its way from the README to docs/results.md."""

import collections
import json
import pathlib
import re

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
RESULTS = REPO_ROOT / "docs" / "results.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))

MAIN_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -e . && "
                ".venv/bin/python -m mmjax.train --workdir /tmp/mmjax_default")
SLOW_COMMAND = ".venv/bin/python -m pytest -n auto -m slow"
MAX_README_LINES = 300

# A number as written in prose and tables: 0.937, 123,588,336, 1.3e-6, 2026 (not the 2 of v2).
NUMBER = re.compile(r"(?<![A-Za-z_\d.])\d+(?:[.,]\d+)*(?:e-?\d+)?")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def ci_test_command() -> str:
    """The command `.ci/run` runs: its last non-comment line."""
    lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")][-1].strip()


def code_lines(markdown: str) -> list[str]:
    """The lines of every fenced code block."""
    return [line.strip() for block in FENCE.findall(markdown) for line in block.splitlines()]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchor of every heading (lower case, punctuation dropped, spaces to '-')."""
    seen = collections.Counter()
    anchors = set()
    for line in FENCE.sub("", markdown).splitlines():
        match = re.match(r"#{1,6} (.*)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def relative_links(path: pathlib.Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_has_the_two_commands():
    lines = code_lines(README.read_text())
    assert MAIN_COMMAND in lines
    assert ci_test_command() in lines, f"the README must show {ci_test_command()!r}"
    assert SLOW_COMMAND in lines


def test_readme_stays_short():
    n = len(README.read_text().splitlines())
    assert n < MAX_README_LINES, f"README.md has {n} lines; long stories go to docs/"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no file)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
            broken.append(f"{target} (no heading)")
    assert not broken, f"{path.name}: " + ", ".join(broken)


def test_no_readme_inside_the_package():
    inside = sorted(p.relative_to(REPO_ROOT).as_posix()
                    for p in (REPO_ROOT / "mmjax").rglob("*.md"))
    assert not inside, f"the package's docs live in docs/: {inside}"


def test_every_moved_figure_is_in_results():
    """Each number of the README's measured results (saved before they moved) occurs in
    docs/results.md at least as often as it did there."""
    fixture = json.loads((REPO_ROOT / "tests" / "fixtures" / "results_numbers.json").read_text())
    have = collections.Counter(NUMBER.findall(RESULTS.read_text()))
    missing = {n: (want, have[n]) for n, want in fixture["numbers"].items() if have[n] < want}
    assert not missing, f"number: (times in the old README, times in results.md): {missing}"


def test_number_pattern():
    assert NUMBER.findall("0.937 of 123,588,336, 1.3e-6 in v2 on 16x16") == [
        "0.937", "123,588,336", "1.3e-6", "16"]
    assert heading_anchors("## TPU pods: compile and fit\n## A\n## A") == {
        "tpu-pods-compile-and-fit", "a", "a-1"}


def test_the_default_run_deselects_the_slow_tests_and_the_readme_says_how_to_run_them():
    import configparser
    import shlex

    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    addopts = shlex.split(config["tool:pytest"]["addopts"])
    assert addopts[addopts.index("-m") + 1] == "not slow"
    assert SLOW_COMMAND in code_lines(README.read_text())


def test_every_listed_slow_test_exists():
    """``tests/slow_tests.txt`` names real tests (a renamed test would silently run by
    default again, or a stale line would hide nothing)."""
    import ast

    from conftest import slow_test_ids

    missing = []
    for test_id in sorted(slow_test_ids()):
        path, _, name = test_id.partition("::")
        function = name.partition("[")[0]
        source = REPO_ROOT / path
        defined = source.exists() and any(
            isinstance(node, ast.FunctionDef) and node.name == function
            for node in ast.walk(ast.parse(source.read_text())))
        if not defined:
            missing.append(test_id)
    assert not missing, missing


STUDIES = REPO_ROOT / "docs" / "studies"


@pytest.mark.parametrize("study", sorted(p.name for p in STUDIES.glob("*") if p.is_dir()))
def test_each_study_table_in_results_is_its_seeds_merged(study, tmp_path):
    """``docs/studies/STUDY/seed*.json`` are the runs as their command wrote them; the joined
    ``docs/studies/STUDY.json`` is their ``merge``, and docs/results.md quotes its table."""
    from mmjax.eval import studies
    from mmjax.eval.__main__ import study_table

    runs = sorted((STUDIES / study).glob("seed*.json"))
    name, rows = studies.merge(runs, str(tmp_path))
    assert name == study
    committed = json.loads((STUDIES / f"{study}.json").read_text())
    assert committed["rows"] == json.loads((tmp_path / f"{study}.json").read_text())["rows"]
    assert (STUDIES / f"{study}.png").exists()
    table = study_table(study, rows)
    assert table in RESULTS.read_text(), f"docs/results.md lacks the table of {study}:\n{table}"
