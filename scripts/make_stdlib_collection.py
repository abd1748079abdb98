"""Write the second DSI test collection: Python standard-library modules, offline.

The embedded dataset (Lee news articles, keyword-bag queries) is what the demo's defaults were tuned
on. This one checks that they carry over to other text and other queries:
- documents: the module docstrings of pure-Python standard-library modules and packages (technical
  English, not news), those with at least 25 words;
- queries: whole sentences in plain English, written by other authors and not sampled from the
  document: the first sentence of each public function's or class's own docstring, which the module
  docstring does not contain ("return the number of days in a month"), lowercased, at most 4 per
  module. The embedded dataset's queries are shuffled keyword bags; these keep word order and
  function words. The qrel is the module.

    python scripts/make_stdlib_collection.py examples/stdlib_collection

The committed copy in examples/stdlib_collection was written by Python 3.11.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
import sysconfig


def first_sentence(doc: str) -> str:
    line = " ".join(doc.strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s", line)[0].rstrip(".")


def as_query(summary: str) -> str | None:
    text = re.sub(r"[`'\"*]", "", summary).strip()
    words = text.split()
    if len(words) < 5 or len(words) > 25 or not words[0][0].isalpha():
        return None
    return text[0].lower() + text[1:]


def main(out_dir: str) -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    docs, queries, qrels = [], [], []
    for name in sorted(os.listdir(stdlib)):
        path = os.path.join(stdlib, name)
        if os.path.isfile(os.path.join(path, "__init__.py")):  # a package: its __init__'s docstring
            path, name = os.path.join(path, "__init__.py"), name + ".py"
        if not name.endswith(".py") or name.startswith("_") or not os.path.isfile(path):
            continue
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError):
            continue
        module_doc = ast.get_docstring(tree)
        if not module_doc or len(module_doc.split()) < 25:
            continue
        module = name[:-3]
        made = 0
        for node in tree.body:
            if made == 4:
                break
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            question = as_query(first_sentence(doc)) if doc else None
            if question is None or first_sentence(doc) in module_doc:
                continue
            queries.append((f"{module}.{node.name}", question))
            qrels.append((f"{module}.{node.name}", module))
            made += 1
        docs.append({"id": module, "contents": " ".join(module_doc.split())})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(os.path.join(out_dir, "queries.tsv"), "w") as f:
        f.writelines(f"{q}\t{t}\n" for q, t in queries)
    with open(os.path.join(out_dir, "qrels.txt"), "w") as f:
        f.writelines(f"{q} 0 {d} 1\n" for q, d in qrels)
    print(f"{len(docs)} documents, {len(queries)} queries -> {out_dir} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/stdlib_collection")
