"""Every recorded run of issue 6's CPU benchmark as one markdown table, read from the reports in benchmarks/results/.

README's history table is this script's output (a test checks they agree), so no figure there lacks a result file:

    python benchmarks/history.py            # print the table
    python benchmarks/history.py --latest benchmarks/results/FILE.md   # README's table of the latest run
    python benchmarks/history.py --check    # exit 1 if README's tables are not these
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PATTERN = (
    "cpu-smollm2-2*.md"  # SmolLM2 real weights, the CPU workload (8 tenants, prompt 64, 32 tokens)
)
BEGIN = "<!-- history: begin (python benchmarks/history.py) -->"
END = "<!-- history: end -->"
LATEST = re.compile(r"<!-- latest: begin (\S+\.md) -->\n(.*?)\n<!-- latest: end -->", re.S)
SYSTEMS = {
    "a": "a naive: transformers `generate` per request with its prefix (what PEFT users run)",
    "b": "b transformers batched `generate`, prefixes padded to the longest",
    "c": "c our engine, one tenant",
    "d": "**d our engine, every request its own tenant**",
}
HEADERS = [
    "date",
    "machine",
    "dtype",
    "threads",
    "a",
    "b",
    "c",
    "d",
    "d/a",
    "d/c",
    "d/b",
    "d step ms (floor)",
    "token mismatches",
    "file",
]


def _table(text: str) -> dict[str, dict[str, str]]:
    """The report's first table, {system letter: {column: cell}}."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(head):
            break
        rows[cells[0].split()[0]] = dict(zip(head, cells, strict=True))
    return rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def reports(path: Path) -> list[tuple[str, str]]:
    """(label, text) of each report in a result file (an A/B file holds several, each under a `## ` heading)."""
    out: list[tuple[str, str]] = []
    heading = ""
    for block in re.split(r"(?m)^(?=\*\*|## )", path.read_text()):
        if block.startswith("## "):
            heading = block.splitlines()[0][3:].strip()
        elif block.startswith("**") and "out tok/s" in block:
            out.append((heading, block))
    return out


def row(path: Path, label: str, text: str) -> list[str]:
    first = text.splitlines()[0]
    m = re.search(r"\) on (.+?) \(\d+ cores\), (\w+), .*?(\d{4}-\d{2}-\d{2}T[\d:]+Z)", first)
    if m is None:
        raise ValueError(f"{path.name}: no machine/dtype/date in a report's first line")
    machine, dtype, date = m.groups()
    machine = "Intel Xeon" if "Xeon" in machine else machine
    threads = re.search(r"--threads (\d+)", text)
    tab = _table(text)
    tps = {k: _num(r["out tok/s"]) for k, r in tab.items()}
    floor = re.search(r"floor \*\*([\d.]+) ms\*\*", text)
    step = tab.get("d", {}).get("decode step ms", "-")
    bad = [int(x) for x in re.findall(r"\*\*(\d+)/\d+ requests[^*]*differ\*\*", text)]
    # the report's own JSON line where it has one: its ratios and threads, unrounded (the table's tok/s are rounded)
    js = re.search(r"^\{.*\}$", text, re.M)
    data = json.loads(js.group(0)) if js else {}
    ratios = data.get("ratios", {})
    if threads is None and data.get("machine", {}).get("torch_threads"):
        threads = re.match(r"(\d+)", str(data["machine"]["torch_threads"]))

    def ratio(o: str) -> str:
        if f"d/{o}" in ratios:
            return f"{ratios[f'd/{o}']:.2f}"
        return f"{tps['d'] / tps[o]:.2f}" if "d" in tps and o in tps else "-"

    label = label.split("(")[0].strip()
    link = f"[{path.name}](benchmarks/results/{path.name})" + (f" ({label})" if label else "")
    return [
        date,  # (sorted by it, then shown without the time)
        machine,
        dtype,
        threads.group(1) if threads else "-",
        *(f"{tps[k]:,.1f}" if k in tps else "-" for k in "abcd"),
        ratio("a"),
        ratio("c"),
        ratio("b"),
        f"{step} ({float(floor.group(1)):.1f})" if floor else step,
        str(sum(bad)),
        link,
    ]


def history() -> str:
    rows = sorted(
        (row(p, label, text) for p in RESULTS.glob(PATTERN) for label, text in reports(p)),
        key=lambda r: (r[0], r[-1]),
    )
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    out += ["| " + " | ".join([r[0][:10], *r[1:]]) + " |" for r in rows]
    return "\n".join(out)


def latest(path: Path) -> str:
    """README's table of one run (the latest): each system's tok/s, TTFT and ITL p50, decode step."""
    ((_, text),) = reports(path)
    tab = _table(text)
    cols = ["out tok/s", "TTFT p50 ms", "ITL p50 ms", "decode step ms"]
    out = ["| system | " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in range(len(cols) + 1)) + "|"]
    for k, name in SYSTEMS.items():
        if k in tab:
            cells = [tab[k][c] for c in cols]
            if k == "d":
                cells[0] = f"**{cells[0]}**"
            out.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(out)


def readme_table(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with README.md's table")
    ap.add_argument("--latest", type=Path, help="print README's table of this run's result file")
    args = ap.parse_args(argv)
    if args.latest:
        print(latest(args.latest))
        return 0
    table = history()
    if not args.check:
        print(table)
        return 0
    readme = (ROOT / "README.md").read_text()
    if readme_table(readme) != table:
        print("README.md's benchmark history differs from `python benchmarks/history.py`", file=sys.stderr)
        return 1
    m = LATEST.search(readme)
    if m is None or m.group(2).strip() != latest(ROOT / m.group(1)):
        print("README.md's latest table differs from its result file", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
