"""The user docs (README.md, docs/*.md): the site builds strictly, the samples are current, every
Python example runs, every link resolves, every guide and every public name is reachable.

A Python block is skipped only when the HTML comment just above it says why, e.g.
`<!-- docs-test: skip (needs a trained export; run by tests/training/test_predict.py) -->`.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
GUIDES = sorted(p for p in DOCS.glob("*.md"))
PAGES = [REPO_ROOT / "README.md", *GUIDES]
SKIP = re.compile(r"<!-- docs-test: skip \((.+?)\) -->\s*$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
QUIET_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def python_blocks(page):
    """`(line, code, skip_reason)` for every ```python block of `page`."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(2),
                       skip.group(1) if skip else None))
    return blocks


def _without_code(text, inline=True):
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text) if inline else text


def _slug(heading):
    """GitHub's anchor of a Markdown heading (mkdocs' toc gives the same for these pages)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page):
    headings = re.findall(r"^#+ (.+)$", _without_code(page.read_text(), inline=False), re.M)
    return {_slug(h) for h in headings}


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip('mkdocs is not installed: pip install -e ".[test]" installs it')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, env=QUIET_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "layers" / "index.html").exists()


def test_samples_are_regenerated_by_the_script():
    result = subprocess.run([sys.executable, "docs/generate_samples.py", "--check"], cwd=REPO_ROOT,
                            env=QUIET_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_every_included_sample_exists_and_every_sample_is_included():
    included = set()
    for page in GUIDES:
        included |= set(re.findall(r'--8<-- "samples/([^"]+)"', page.read_text()))
    assert included == {p.name for p in (DOCS / "samples").glob("*.txt")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_python_examples_run(page, tmp_path, monkeypatch):
    """Each page's Python blocks run in order in one namespace, in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, code, skip in python_blocks(page):
        if skip:
            continue
        exec(compile(code, f"{page.name}:{line}", "exec"), namespace)  # noqa: S102 - our docs


def test_skipped_examples_are_few_and_say_why():
    skipped = [(page.name, line, why) for page in PAGES for line, _, why in python_blocks(page) if why]
    assert len(skipped) <= 4, skipped
    assert all(len(why) > 20 for _, _, why in skipped), skipped


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_relative_links_resolve(page):
    """Links work on GitHub (relative paths) and their anchors exist."""
    for target in LINK.findall(_without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: {target}"


def test_every_guide_is_reachable_from_the_readme_and_the_nav():
    readme = (REPO_ROOT / "README.md").read_text()
    nav = (REPO_ROOT / "mkdocs.yml").read_text()
    for guide in GUIDES:
        assert f"(docs/{guide.name})" in readme, guide.name
        assert f" {guide.name}\n" in nav, guide.name
    for page in (DOCS / "api").glob("*.md"):
        assert f" api/{page.name}\n" in nav, page.name


def test_every_public_name_is_in_the_api_reference():
    import tf_revnet

    reference = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    documented = set(re.findall(r"^::: tf_revnet\.(\S+)$", reference, re.M))
    for module in ("callbacks", "diagnostics", "memory", "models", "layers.unit"):
        listed = re.search(rf"^::: tf_revnet\.{re.escape(module)}\n    options:\n      members:\n"
                           r"((?:        - \S+\n)+)", reference, re.M)
        assert listed, module
        members = re.findall(r"- (\S+)", listed.group(1))
        assert members == list(importlib.import_module(f"tf_revnet.{module}").__all__), module
        documented |= set(members)
    for name in tf_revnet.__all__:
        if name not in ("__version__", "layers"):  # tf_revnet.layers: its names are in __all__ too
            assert name in documented, name


def test_user_docs_hold_no_development_history():
    for page in PAGES:
        text = page.read_text()
        for pattern in (r"\b20\d\d-\d\d-\d\d\b", r"not yet run", r"target\b.*\bmissed", r"session"):
            assert not re.search(pattern, text, re.I), (page.name, pattern)
