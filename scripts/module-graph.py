#!/usr/bin/env python3
"""Prints the import graph between the server's top-level modules (src/<module>) and any cycle.

Reads `crate::<module>` paths in each file (use lines and inline paths), so a cycle between
two concerns shows up whatever the import style. Exit status 1 when a cycle exists.

    python3 scripts/module-graph.py
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_of(path):
    rel = os.path.relpath(path, ROOT)
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def strip_tests(text):
    """Drops `#[cfg(test)]` modules (tests may reach anywhere; only production code counts)."""
    out, pos = [], 0
    pattern = re.compile(r"#\[cfg\(test\)\]\s*(?:(?:///|//)[^\n]*\n\s*)*(?:pub(?:\([a-z]+\))? )?mod \w+\s*\{")
    for m in pattern.finditer(text):
        if m.start() < pos:
            continue
        out.append(text[pos : m.start()])
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        pos = i
    out.append(text[pos:])
    return "".join(out)


graph = {}
for dirpath, _, files in os.walk(ROOT):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        src = module_of(path)
        if src in ("main", "lib"):
            continue
        text = strip_tests(open(path, encoding="utf-8").read())
        text = re.sub(r"//[^\n]*", "", text)
        deps = set(re.findall(r"crate::([a-z_]+)", text))
        # grouped imports: use crate::{a::.., b::..}
        for group in re.findall(r"crate::\{([^}]*)\}", text):
            deps |= set(re.findall(r"(?:^|,)\s*([a-z_]+)", group))
        graph.setdefault(src, set()).update(d for d in deps if d != src)

for m in sorted(graph):
    print(f"{m:12} -> {', '.join(sorted(graph[m])) or '-'}")

# cycles (Tarjan's strongly connected components)
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
        if w not in graph:
            continue
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in sorted(graph):
    if v not in index:
        visit(v)
if sccs:
    for c in sccs:
        print("cycle:", " <-> ".join(c))
    sys.exit(1)
print("no cycles")
