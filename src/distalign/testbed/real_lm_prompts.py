"""The prompts of the real-model world (`real_lm`), built from text that ships with Python.

    python -m distalign.testbed.real_lm_prompts            # rewrites data/real_lm_prompts.jsonl
    python -m distalign.testbed.real_lm_prompts --check    # exit 1 if regenerating would change it

None of the prompts is written by hand: each is one of three question forms filled with a name or a
sentence of the standard library's own source, read with `ast` (nothing is imported, so modules
with side effects such as `antigravity` stay harmless):
- "module":    What is the Python module `json` used for?         (every public stdlib module with source)
- "function":  What does `json.dumps` do in Python?               (public top-level functions and classes
                                                                   that have a docstring)
- "docstring": Explain in simple words: "<first docstring line>"  (those docstrings' first lines)
Rows are deduplicated on their lower-cased text, ordered by a hash of the text (so the order is
independent of the file system's), and split by that hash into train / validation / test. The same
CPython minor version with the same optional modules installed regenerates the same file byte for
byte; `data/real_lm_prompts.meta.json` records the version it was made with.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
PROMPTS_FILE = DATA_DIR / "real_lm_prompts.jsonl"
META_FILE = DATA_DIR / "real_lm_prompts.meta.json"
SPLITS = (("test", 0.15), ("validation", 0.15), ("train", 0.70))
PER_KIND = {"module": 160, "function": 320, "docstring": 320}   # 800 before deduplication
MAX_PER_MODULE = 8                                                # functions / docstrings per module
SKIP_MODULES = {"antigravity", "this", "__phello__"}
TEMPLATES = {"module": "What is the Python module `{name}` used for?",
             "function": "What does `{name}` do in Python?",
             "docstring": 'Explain in simple words: "{line}"'}
_SENTENCE = re.compile(r"^[A-Z][A-Za-z0-9 ,;'()`.\-]{20,95}\.$")


def stdlib_sources() -> list[tuple[str, Path]]:
    """(module name, source file) of every public stdlib module implemented in Python, sorted."""
    found = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None) or ""
        if origin.endswith(".py"):
            found.append((name, Path(origin)))
    return found


def first_line(docstring: str | None) -> str | None:
    """The docstring's first line if it reads as one plain sentence, else None."""
    if not docstring:
        return None
    line = docstring.strip().splitlines()[0].strip()
    return line if _SENTENCE.match(line) and ">>>" not in line else None


def documented_names(module: str, source: Path) -> list[tuple[str, str]]:
    """(module.name, first docstring line) of public top-level functions and classes, in file order."""
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    named = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            line = first_line(ast.get_docstring(node))
            if line:
                named.append((f"{module}.{node.name}", line))
    return named[:MAX_PER_MODULE]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def candidates() -> dict[str, list[dict]]:
    """Every possible row of each kind, before selection."""
    rows: dict[str, list[dict]] = {kind: [] for kind in TEMPLATES}
    for module, source in stdlib_sources():
        rows["module"].append({"prompt": TEMPLATES["module"].format(name=module), "source": module})
        for name, line in documented_names(module, source):
            rows["function"].append({"prompt": TEMPLATES["function"].format(name=name), "source": name})
            rows["docstring"].append({"prompt": TEMPLATES["docstring"].format(line=line), "source": name})
    return rows


def split_of(text: str) -> str:
    """train / validation / test from the text's hash: stable under adding or removing other rows."""
    u = int(_digest("split:" + text)[:8], 16) / 16 ** 8
    edge = 0.0
    for name, share in SPLITS:
        edge += share
        if u < edge:
            return name
    return SPLITS[-1][0]


def build_rows() -> list[dict]:
    """The selected, deduplicated rows with kind and split, ordered by the hash of their text."""
    seen, rows = set(), []
    for kind, found in candidates().items():
        picked = sorted(found, key=lambda r: _digest(r["prompt"]))[:PER_KIND[kind]]
        for row in picked:
            key = row["prompt"].lower()
            if key not in seen:
                seen.add(key)
                rows.append({"prompt": row["prompt"], "kind": kind, "source": row["source"],
                             "split": split_of(row["prompt"])})
    rows.sort(key=lambda r: _digest(r["prompt"]))
    return [{"id": i, **row} for i, row in enumerate(rows)]


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows)


def meta(rows: list[dict]) -> dict:
    counts = {name: sum(r["split"] == name for r in rows) for name, _ in SPLITS}
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "rows": len(rows), "splits": counts,
            "sha256": _digest(render(rows)), "made_by": "python -m distalign.testbed.real_lm_prompts"}


def load_prompts(split: str | None = None, path: Path = PROMPTS_FILE) -> list[dict]:
    """The committed rows (optionally one split's), in file order."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="(Re)build the real-model world's prompts from the stdlib.")
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    parser.add_argument("--out", type=Path, default=PROMPTS_FILE)
    args = parser.parse_args(argv)
    rows = build_rows()
    text = render(rows)
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs from a fresh build'} ({len(rows)} rows)")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    if args.out == PROMPTS_FILE:
        META_FILE.write_text(json.dumps(meta(rows), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} prompts to {args.out}: {meta(rows)['splits']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
