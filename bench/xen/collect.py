"""Copy the lab's real-Xen benchmark numbers into bench/results.json (key ``real_xen``).

``python3 bench/xen/collect.py RUN/out/bench-xen.json bench/results.json`` --
run by `make bench-xen` after the lab (bench/xen/test_real_xen.py wrote the
first file in dom0).  The other keys of results.json are left as they are.

``python3 bench/xen/collect.py RUN/out/bench-xen-migrate.json bench/results.json
real_xen_migration`` -- the live migration benchmark's numbers, likewise.

``python3 bench/xen/collect.py --reset bench/results.json`` -- run by
`make bench` before it measures: drops every key but the lab's (they are not
re-measured by `make bench`, and must survive it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEY = "real_xen"
#: the live migration benchmark's numbers (bench/xen/test_migrate_downtime.py)
KEYS = (KEY, "real_xen_migration")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--reset":
        dst = Path(argv[1])
        old = json.loads(dst.read_text()) if dst.is_file() else {}
        kept = {k: old[k] for k in KEYS if k in old}
        dst.write_text(json.dumps(kept, indent=1, sort_keys=True))
        return 0
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] not in KEYS):
        print("usage: collect.py BENCH_XEN_JSON RESULTS_JSON [KEY]", file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    key = argv[2] if len(argv) == 3 else KEY
    if not src.is_file():
        print(f"collect.py: {src} is missing: did the lab run the benchmark?", file=sys.stderr)
        return 1
    numbers = json.loads(src.read_text())
    results = json.loads(dst.read_text()) if dst.is_file() else {}
    results[key] = numbers
    dst.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"{dst}: {key} updated from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
