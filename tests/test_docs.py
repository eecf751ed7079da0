"""The docs: built strictly, their references written from the code, every sweep file and
command in them checked against the real parsers, every measured figure dated, and the site's
navigation seen in a real browser."""

from __future__ import annotations

import dataclasses
import html
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optimsweep.cli import build_parser
from optimsweep.core.train import TrainConfig, _in
from optimsweep.errors import SpecError, UsageError
from optimsweep.reference import MARKERS, _commands
from optimsweep.sweep import keys, spec
from optimsweep.sweep.samplers import PRUNERS, SAMPLERS, allowed_options

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
MAKEFILE = (ROOT / "Makefile").read_text()
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[\w-]*)")


def _blocks(kind: str) -> list[tuple[str, str]]:
    """(where, text) of every fenced block of `kind` in the README and the docs."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            opening = FENCE.match(lines[i])
            if not opening:
                i += 1
                continue
            indent, start, body = len(opening["indent"]), i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i][indent:])
                i += 1
            i += 1
            if opening["info"] == kind:
                found.append((f"{page.relative_to(ROOT)}:{start}", "\n".join(body)))
    return found


def _ids(blocks):
    return [where for where, _ in blocks]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `make docs` builds it: strictly, so a broken link, a missing page, a bad
    anchor or a snippet that isn't there fails."""
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _text(html_file: Path) -> str:
    """A page as a reader sees its text: tags gone, entities read, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", html_file.read_text())).split())


def _shown(markdown: str) -> str:
    """Markdown's text as the page shows it."""
    return " ".join(markdown.replace("`", "").split())


# --- references that can't drift ---------------------------------------------------------

def test_the_sweep_file_reference_names_every_key_value_and_option(site):
    page = _text(site / "reference" / "sweep-file" / "index.html")
    assert "<!-- reference" not in page
    for key in keys.KEYS:
        assert key.name in page and _shown(key.meaning) in page, key.name
    settable = [f for f in dataclasses.fields(TrainConfig)
                if f.name not in spec.NOT_SEARCHABLE and f.type != "dict"]
    for f in settable:
        assert f.name in page and _shown(f.metadata["doc"]) in page, f.name
    for registry in (SAMPLERS, PRUNERS):
        for name, cls in registry.items():
            assert all(option in page for option in allowed_options(cls)), name


def test_the_command_line_reference_names_every_command_and_flag(site):
    page = _text(site / "reference" / "cli" / "index.html")
    for name, _, sub in _commands(build_parser()):
        assert f"optimsweep {name}" in page
        for action in sub._actions:
            for flag in set(action.option_strings) - {"-h", "--help"}:
                assert flag in page and _shown(action.help.replace("%%", "%")) in page, flag


def test_every_key_field_and_flag_carries_its_text():
    assert all(k.meaning.strip() and k.type.strip() for k in keys.KEYS)
    assert all(f.metadata["doc"].strip() for f in dataclasses.fields(TrainConfig))
    with pytest.raises(TypeError):  # a training value can't be added without its text
        _in("run", 0)
    with pytest.raises(ValueError, match="its meaning is empty"):
        keys.Key("budget.new", "integer", "1", "an integer", " ")
    for name, _, sub in _commands(build_parser()):
        for action in sub._actions:
            assert action.help, f"optimsweep {name} {action.dest} has no help text"


def test_the_parser_accepts_exactly_the_keys_the_reference_lists(tmp_path):
    """A key outside the table is refused, and the line lists the table's keys."""
    with pytest.raises(SpecError) as refused:
        spec.parse("budget: {n_trials: 2, max_hours: 3}\nsearch_space: {lr: [0.1]}")
    assert refused.value.args[0].endswith("budget.max_hours: unknown key; allowed: "
                                          + ", ".join(keys.children("budget")))
    assert spec.TOP_LEVEL_KEYS == tuple(k.name for k in keys.KEYS if "." not in k.name)


def test_every_reference_marker_is_on_a_page():
    pages = "".join(p.read_text() for p in (DOCS / "reference").glob("*.md"))
    assert all(marker in pages for marker in MARKERS)


# --- every example is real ---------------------------------------------------------------

SWEEP_BLOCKS = _blocks("yaml")
FRAGMENT_SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}


@pytest.mark.parametrize(("where", "text"), SWEEP_BLOCKS, ids=_ids(SWEEP_BLOCKS))
def test_every_sweep_file_in_the_docs_parses(where, text):
    """A whole sweep file, or a fragment of top-level keys (given a search space to parse)."""
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict), f"{where}: a yaml block is a sweep file or a part of one"
    if "search_space" not in raw:
        raw["search_space"] = FRAGMENT_SPACE
    spec.parse(yaml.safe_dump(raw), path=where)


def test_the_docs_show_sweep_files():
    assert len(SWEEP_BLOCKS) >= 5


def _make_targets() -> dict[str, str]:
    """{target: the optimsweep command line its recipe runs, as written, or ""}."""
    targets = {}
    for match in re.finditer(r"^([a-z][\w-]*):(?!=)[^\n]*\n((?:\t[^\n]*\n)*)", MAKEFILE, re.M):
        command = re.search(r"\$\(BIN\)/optimsweep ([^\n]*)", match[2])
        targets[match[1]] = command[1] if command else ""
    return targets


def _make_command(recipe: str, settings: dict[str, str]) -> list[str]:
    """A recipe's optimsweep arguments with make's variables filled in: those given on the
    command line, else the Makefile's defaults (`VAR ?= value`)."""
    defaults = dict(re.findall(r"^(\w+)[ \t]*\?=[ \t]*(.*?)[ \t]*$", MAKEFILE, re.M))
    return shlex.split(re.sub(r"\$\((\w+)\)",
                              lambda m: settings.get(m[1], defaults.get(m[1], "")), recipe))


def _commands_in(text: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split at
    `&&`, `;` and `|`."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        current = []
        for word in words + [";"]:
            if word in ("&&", ";", "|", "||", "&"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word.rstrip(";"))
    return commands


def _check_optimsweep(argv: list[str], where: str) -> None:
    try:
        build_parser().parse_args(argv)
    except UsageError as exc:
        pytest.fail(f"{where}: `optimsweep {shlex.join(argv)}`: {exc}")


SHELL_BLOCKS = _blocks("bash")


@pytest.mark.parametrize(("where", "text"), SHELL_BLOCKS, ids=_ids(SHELL_BLOCKS))
def test_every_command_in_the_docs_exists_with_its_flags(where, text):
    targets = _make_targets()
    for words in _commands_in(text):
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]) or \
                words[:1] == ["export"]:
            words = words[1:]
        if not words:
            continue
        program = Path(words[0]).name
        if program == "optimsweep":
            _check_optimsweep(words[1:], where)
        elif program == "make":
            settings = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            for target in [w for w in words[1:] if "=" not in w and not w.startswith("-")]:
                assert target in targets, f"{where}: make {target}: no such target"
                if targets[target]:
                    _check_optimsweep(_make_command(targets[target], settings), where)


PYTHON_BLOCKS = _blocks("python")


@pytest.mark.parametrize(("where", "text"), PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_every_python_example_in_the_docs_compiles(where, text):
    compile(text, where, "exec")


def test_the_docs_show_commands():
    assert len(SHELL_BLOCKS) >= 5


def test_the_readme_is_short_and_its_links_lead_somewhere():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which isn't there"


# --- figures with provenance -------------------------------------------------------------

MEASURED = re.compile(r"\d(?:\.\d+)?\s?(?:s|%|x|min)(?![\w-])")
PROVENANCE = re.compile(r"\b20\d\d-\d\d-\d\d\b.*\bcommit [0-9a-f]{7,}\b.*"
                        r"(EPYC|Xeon|Core|Ryzen|CPU|GPU|H100|H200|A100)", re.S)


def _tables(page: Path):
    """(the text before it, its rows) of each markdown table."""
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and \
                re.match(r"\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            start = i
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                i += 1
            yield "\n".join(lines[max(0, start - 6):start]), lines[start:i]
        i += 1


def test_no_measured_figure_without_its_date_commit_and_machine():
    for page in [README, *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("*/*.md"))]:
        if page.parent.name == "reference":  # written from the code: no measurements
            continue
        text = page.read_text()
        for before, rows in _tables(page):
            if any(MEASURED.search(row) for row in rows[2:]):
                context = before + "\n" + text.split(rows[0])[0][-600:]
                assert PROVENANCE.search(context), \
                    f"{page.relative_to(ROOT)}: a table of figures without date, commit and " \
                    f"machine above it: {rows[0]}"


def test_each_benchmark_writes_the_results_file_the_docs_include():
    included = set(re.findall(r'--8<-- "results/([\w.]+)"', (DOCS / "benchmarks.md")
                              .read_text()))
    written = {p.name for p in (DOCS / "results").glob("*.md")}
    assert included and included <= written
    for name in included:
        script = ROOT / "benchmarks" / name.replace(".md", ".py")
        assert script.exists() and "--results" in script.read_text(), name


# --- the site in a real browser ----------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (`make test` installs it)")
def test_a_reader_finds_the_reference_through_the_navigation(site, tmp_path):
    """The built site served over HTTP, read in headless Chromium: the home page's
    navigation holds every section of mkdocs.yml, and its links lead to the sweep-file
    reference with its table, and to the command line."""
    from playwright.sync_api import sync_playwright

    from serving import free_port, wait_until_up

    nav = _nav_titles(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1", "--directory", str(site)],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "http.log", "w"))
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, server, tmp_path / "http.log", timeout=30)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            sidebar = page.locator("nav.md-nav--primary")
            for title in nav:
                sidebar.get_by_text(title, exact=True).first.wait_for(state="attached")
            page.screenshot(path=tmp_path / "home.png", full_page=False)
            sidebar.get_by_role("link", name="Sweep-file keys", exact=True).first.click()
            page.wait_for_url("**/reference/sweep-file/")
            page.get_by_role("cell", name="budget.n_trials").wait_for()
            page.screenshot(path=tmp_path / "reference.png", full_page=False)
            sidebar.get_by_role("link", name="Command line", exact=True).first.click()
            page.wait_for_url("**/reference/cli/")
            page.get_by_role("heading", name="optimsweep sweep").first.wait_for()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (tmp_path / "home.png").stat().st_size > 10_000
    assert (tmp_path / "reference.png").stat().st_size > 10_000


def _nav_titles(nav: list) -> list[str]:
    """The titles of mkdocs.yml's navigation, sections and pages."""
    titles = []
    for entry in nav:
        for title, content in entry.items():
            titles.append(title)
            if isinstance(content, list):
                titles += _nav_titles(content)
    return titles
