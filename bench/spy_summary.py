#!/usr/bin/env python3
"""Summarise ``py-spy record --format raw`` files written by ``bench/run.py --py-spy DIR``.

    .venv/bin/python bench/spy_summary.py DIR/run1-warm.txt [more files] [--top 25]

For each file: the number of samples (py-spy counts only non-idle samples unless run
with ``--idle``), the functions with the most *self* samples (the leaf frame: where the
CPU was), and the functions with the most *inclusive* samples (anywhere on the stack,
counted once per stack; by default only the mirror's own and the web/logging layers'
functions, as the reactor's frames are on every stack), each as a % of all samples.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+?)(?::(?P<line>\d+))?\)$")


def frame_key(frame: str) -> str:
    """``func (file)`` without the line number, site-packages prefixes trimmed."""
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append(([frame_key(f) for f in stack.split(";")], int(count)))
    return stacks


def summarize(path: Path, top: int, incl_match: re.Pattern[str]) -> str:
    stacks = load(path)
    total = sum(c for _, c in stacks)
    if not total:
        return f"## {path.name}: no samples\n"
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in stacks:
        selfc[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    threads: Counter[str] = Counter()
    for frames, count in stacks:
        threads[next((f for f in frames if f.startswith("thread (")), "(no thread ids)")] += count
    out = [f"## {path.name}: {total} samples", ""]
    if len(threads) > 1 or "(no thread ids)" not in threads:
        out += ["samples  thread (py-spy --threads)"]
        out += [f"{c:7d}  {t}" for t, c in threads.most_common(10)] + [""]
    out += ["self %  function"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in selfc.most_common(top)]
    out += ["", f"incl %  function (matching {incl_match.pattern})"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in
            [(f, c) for f, c in incl.most_common() if incl_match.search(f)][:top]]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--incl-match", default=r"\((mirror/|twisted/(web|logger)/|treq/|hashlib|http/cookiejar)",
                   help="regex: which functions the inclusive list shows (default: the mirror's and the web layers')")
    args = p.parse_args()
    for f in args.files:
        print(summarize(f, args.top, re.compile(args.incl_match)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
