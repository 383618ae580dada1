"""The committed Markdown: every relative link and #anchor resolves."""

import os
import re
import subprocess
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files():
    try:
        out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        out = []
        for base, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build",)]
            out += [os.path.relpath(os.path.join(base, f), ROOT) for f in files
                    if f.endswith(".md")]
    return sorted(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped (hyphens
    and underscores kept), spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    out, seen = set(), {}
    fence = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.lstrip().startswith("```"):
                fence = not fence
                continue
            m = None if fence else HEADING.match(line)
            if m:
                s = slug(m.group(2))
                n = seen.get(s, 0)
                seen[s] = n + 1
                out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: str):
    fence = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                fence = not fence
                continue
            if fence:
                continue
            for m in LINK.finditer(line):
                yield number, m.group(1)


FILES = markdown_files()


def test_there_is_markdown():
    assert "README.md" in FILES


@pytest.mark.parametrize("md", FILES)
def test_relative_links_resolve(md):
    bad = []
    base = os.path.dirname(os.path.join(ROOT, md))
    for line, target in links(os.path.join(ROOT, md)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, md)
        if not os.path.exists(full):
            bad.append(f"{md}:{line}: {target}: no such file")
            continue
        if anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{md}:{line}: {target}: no heading with anchor #{anchor}")
    assert not bad, "\n".join(bad)


def test_slug_rules():
    assert slug("The CUDA kernels without a GPU: the emulated backend") == \
        "the-cuda-kernels-without-a-gpu-the-emulated-backend"
    assert slug("Kernel benchmark (the main job)") == "kernel-benchmark-the-main-job"
    assert slug("`make bench`, 2 cores") == "make-bench-2-cores"
