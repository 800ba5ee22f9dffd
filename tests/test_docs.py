"""Citations resolve: every source article, claim and catalogue case the code cites is in
``docs/``, and the docs themselves point at things that exist.

The code cites ``docs/sources.md#seed-000`` (one anchor per source article),
``docs/claims.md`` (optionally ``#<experiment id>``) and ``docs/reliability.md case N`` (or
``cases N-M``, ``#case-N``). Anything else that names a seed or a catalogue case by number,
a docs file without its ``docs/`` path, or a document outside the repository (the project's
spec, style guide or reference files), is a citation a reader cannot follow, and fails here.
This file is scanned too, so it spells the patterns it looks for so that they do not match
themselves. Anchors are GitHub's: a heading's text, lower-cased, punctuation dropped, spaces
to hyphens."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from normlab.experiments import registry

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _scanned() -> list[Path]:
    """Source, tests, README and benchmarks: every text file a citation can sit in."""
    files = [REPO / "README.md"]
    for top, suffixes in (
        ("src", {".py", ".json", ".md", ".txt"}),
        ("tests", {".py", ".md", ".json"}),
        ("benchmarks", {".py", ".md"}),
    ):
        files += [p for p in sorted((REPO / top).rglob("*")) if p.suffix in suffixes]
    return [p for p in files if p.is_file()]


SCANNED = _scanned()

# a resolving citation: a docs file, maybe an anchor, and for the catalogue maybe case numbers
CITED = re.compile(
    r"docs/(sources|claims|reliability)\.md(?:#([\w-]+))?"
    r"(?:\s+cases?\s+(\d+)(?:\s*[-–]\s*(\d+))?)?"
)
# what is left after blanking those out must not cite anything
UNRESOLVED = {
    "a seed by number (cite its section of docs/sources.md)": re.compile(
        r"\bseed[ -]?0\d\d\b", re.IGNORECASE
    ),
    "a catalogue case by number (cite docs/reliability.md case N)": re.compile(
        r"\breliability(?:\s+(?:case|cases|catalogue)\b|\s+\d)", re.IGNORECASE
    ),
    "a docs file without its docs/ path": re.compile(r"\b(?:claims|sources|reliability)\.md"),
    "a document outside the repository": re.compile(
        r"[/]work/|\bshared[/]|reference[/]claims|\bSPEC(?:\.md|\s*§)|\bSTYLE\.md|seeds[/]README"
    ),
}


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def _anchors(doc: Path) -> frozenset[str]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    return frozenset(_slug(m.group(1)) for ln in lines if (m := re.match(r"#+\s+(.*)", ln)))


def _case_numbers() -> set[int]:
    return {
        int(a[len("case-") :]) for a in _anchors(REPO / "docs/reliability.md") if a[5:].isdigit()
    }


def _problems(path: Path, root: Path = REPO) -> list[str]:
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root)
    found = []

    def where(pos: int) -> str:
        return f"{rel}:{text.count(chr(10), 0, pos) + 1}"

    for m in CITED.finditer(text):
        doc, anchor, first, last = m.groups()
        if anchor and anchor not in _anchors(DOCS / f"{doc}.md"):
            found.append(f"{where(m.start())}: no section {anchor!r} in docs/{doc}.md")
        if first and doc != "reliability":
            found.append(f"{where(m.start())}: 'cases' cite docs/reliability.md, not {doc}.md")
        elif first:
            for n in range(int(first), int(last or first) + 1):
                if n not in _case_numbers():
                    found.append(f"{where(m.start())}: no case {n} in docs/reliability.md")
    # blank the resolving citations out (keeping offsets), then nothing may cite
    rest = CITED.sub(lambda m: " " * len(m.group(0)), text)
    for what, pattern in UNRESOLVED.items():
        for m in pattern.finditer(rest):
            found.append(f"{where(m.start())}: {m.group(0)!r} cites {what}")
    return found


def test_the_scan_sees_the_code():
    names = {p.relative_to(REPO).as_posix() for p in SCANNED}
    assert {"README.md", "src/normlab/cli/run.py", "tests/conftest.py"} <= names
    assert any(n.startswith("benchmarks/") for n in names)


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_citation_resolves(path):
    problems = _problems(path)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_it_should(tmp_path):
    # the test above cannot pass vacuously: each kind of bad citation is found
    bad = tmp_path / "bad.py"
    # (the bad citations are assembled, so that this file's own scan stays clean)
    words = {
        "s": "seed",
        "S": "Seed",
        "r": "reliability",
        "c": "claims",
        "p": "SPEC",
        "x": "9",
        "h": "#",
    }
    bad.write_text(
        "# {s} 002 says; {S} 000's story; {r} case 3; {r} 7\n"
        "# see reference/{c}.md and {p} §2.2, {c}.md\n"
        "# docs/sources.md{h}seed-00{x}, docs/reliability.md case 9{x}, docs/claims.md{h}n{x}pe\n"
        "# fine: docs/sources.md#seed-002, docs/reliability.md cases 1-4, docs/claims.md#sync\n"
        "".format(**words),
        encoding="utf-8",
    )
    problems = _problems(bad, root=tmp_path)
    text = "\n".join(problems)
    for expected in (
        "'{s} 002'",
        "'{S} 000'",
        "'{r} case'",
        "'{r} 7'",
        "'reference/{c}'",
        "'{p} §'",
        "'{c}.md' cites a docs file",
        "no section 'seed-00{x}'",
        "no case 9{x}",
        "no section 'n{x}pe'",
    ):
        expected = expected.format(**words)
        assert expected in text, f"{expected} not reported:\n{text}"
    assert all(":4:" not in p for p in problems), text  # the resolving line is clean


def test_every_experiment_has_a_section_in_claims_md_with_its_command():
    text = (REPO / "docs/claims.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## ([a-z0-9-]+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    missing = [i for i in registry.all_ids() if i not in sections]
    assert not missing, f"docs/claims.md has no '## <id>' section for {missing}"
    for claim_id in registry.all_ids():
        body = sections[claim_id]
        assert f"`normlab run {claim_id}`" in body, f"{claim_id}: no reproduce command"
        for field in ("**Claim:**", "**Source:**", "**Rule:**", "**Reproduce:**"):
            assert field in body, f"{claim_id}: no {field} line"
    extra = set(sections) - set(registry.all_ids()) - {"demo", "references"}
    assert not extra, f"docs/claims.md has sections for unknown experiments: {sorted(extra)}"


def test_sources_md_has_the_five_seeds():
    assert {f"seed-00{i}" for i in range(5)} <= _anchors(REPO / "docs/sources.md")


def test_reliability_md_keeps_the_catalogue_numbering():
    assert _case_numbers() == set(range(1, 27))


def _docs_texts() -> list[Path]:
    return [*sorted(DOCS.glob("*.md")), REPO / "README.md"]


@pytest.mark.parametrize("doc", _docs_texts(), ids=lambda p: p.name)
def test_docs_links_and_anchors_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    bad = []
    for m in re.finditer(r"\]\(([^)\s#]*)(?:#([^)\s]+))?\)", text):
        target, anchor = m.group(1), m.group(2)
        if target.startswith(("http://", "https://")):
            continue
        path = (doc.parent / target) if target else doc
        if not path.exists():
            bad.append(f"{m.group(0)}: no file {target}")
        elif anchor and anchor not in _anchors(path):
            bad.append(f"{m.group(0)}: no heading for #{anchor} in {path.name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_tests_named_in_the_docs_exist(doc):
    text = doc.read_text(encoding="utf-8")
    bad = []
    for m in re.finditer(r"(tests/[\w/]+\.py)(?:::(\w+))?", text):
        path = REPO / m.group(1)
        if not path.is_file():
            bad.append(f"{m.group(0)}: no such file")
        elif m.group(2) and not re.search(
            rf"^\s*(?:async\s+)?def {m.group(2)}\(", path.read_text(encoding="utf-8"), re.M
        ):
            bad.append(f"{m.group(0)}: no test {m.group(2)} in {m.group(1)}")
    assert not bad, "\n".join(bad)
