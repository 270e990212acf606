"""docs/theory.md and the Chinese tutorial point at code by name: every such reference must resolve."""

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
REF = re.compile(r"(lmforge/[\w/]+)\.py: ?`?([A-Za-z_][\w.]*)")


@pytest.mark.parametrize("doc,least", [("theory.md", 15), ("tutorial-chinese.md", 4)])
def test_references_resolve(doc, least):
    text = (DOCS / doc).read_text(encoding="utf-8")
    refs = set(REF.findall(text))
    assert len(refs) >= least, f"{doc} should point at the functions that compute each formula"
    missing = []
    for path, name in sorted(refs):
        obj = importlib.import_module(path.replace("/", "."))
        for part in name.split("."):
            if part == "tok_emb":  # an attribute set in __init__, not a class member
                break
            if not hasattr(obj, part):
                missing.append(f"{path}.py: {name}")
                break
            obj = getattr(obj, part)
    assert not missing, missing
