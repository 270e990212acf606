"""docs/theory.md points at code by name: every such reference must resolve."""

import importlib
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
REF = re.compile(r"(lmforge/[\w/]+)\.py: ?`?([A-Za-z_][\w.]*)")


def test_theory_references_resolve():
    text = (DOCS / "theory.md").read_text(encoding="utf-8")
    refs = set(REF.findall(text))
    assert len(refs) >= 15, "theory.md should point at the functions that compute each formula"
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
