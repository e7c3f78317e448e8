"""Copy the lab's real-Xen benchmark numbers into bench/results.json (key ``real_xen``).

``python3 bench/xen/collect.py RUN/out/bench-xen.json bench/results.json`` --
run by `make bench-xen` after the lab (bench/xen/test_real_xen.py wrote the
first file in dom0).  The other keys of results.json are left as they are.

``python3 bench/xen/collect.py --reset bench/results.json`` -- run by
`make bench` before it measures: drops every key but ``real_xen`` (the lab's
numbers are not re-measured by `make bench`, and must survive it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEY = "real_xen"


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--reset":
        dst = Path(argv[1])
        old = json.loads(dst.read_text()) if dst.is_file() else {}
        kept = {KEY: old[KEY]} if KEY in old else {}
        dst.write_text(json.dumps(kept, indent=1, sort_keys=True))
        return 0
    if len(argv) != 2:
        print("usage: collect.py BENCH_XEN_JSON RESULTS_JSON", file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    if not src.is_file():
        print(f"collect.py: {src} is missing: did the lab run the benchmark?", file=sys.stderr)
        return 1
    numbers = json.loads(src.read_text())
    results = json.loads(dst.read_text()) if dst.is_file() else {}
    results[KEY] = numbers
    dst.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"{dst}: real_xen updated from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
