"""Copy the lab's real-Xen benchmark numbers into bench/results.json (key ``real_xen``).

``python3 bench/xen/collect.py RUN/out/bench-xen.json bench/results.json`` --
run by `make bench-xen` after the lab (bench/xen/test_real_xen.py wrote the
first file in dom0).  The other keys of results.json are left as they are.

``python3 bench/xen/collect.py RUN/out/bench-xen-migrate.json bench/results.json
real_xen_migration`` -- the live migration benchmark's numbers, likewise; and
``RUN/out/hostwide.json ... host_lifecycle_real`` the lab's host save-all and
restore-all against xendomains' way (tests/xen/test_hostwide_real.py).

Several sources (``collect.py RUN1/out/X.json RUN2/out/X.json bench/results.json
KEY``) are merged key by key, the later winning: lab runs of a part of a
benchmark (``-k``) each leave only their part.

``python3 bench/xen/collect.py --reset bench/results.json`` -- run by
`make bench` before it measures: drops every key but the lab's (they are not
re-measured by `make bench`, and must survive it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEY = "real_xen"
#: the live migration benchmark's numbers (bench/xen/test_migrate_downtime.py), and
#: the lab's host save-all/restore-all against xendomains' way
#: (tests/xen/test_hostwide_real.py's hostwide.json)
KEYS = (KEY, "real_xen_migration", "host_lifecycle_real")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--reset":
        dst = Path(argv[1])
        old = json.loads(dst.read_text()) if dst.is_file() else {}
        kept = {k: old[k] for k in KEYS if k in old}
        dst.write_text(json.dumps(kept, indent=1, sort_keys=True))
        return 0
    key = argv.pop() if len(argv) >= 3 and argv[-1] in KEYS else KEY
    if len(argv) < 2:
        print("usage: collect.py BENCH_XEN_JSON... RESULTS_JSON [KEY]", file=sys.stderr)
        return 2
    *srcs, dst = map(Path, argv)
    numbers: dict[str, object] = {}
    for src in srcs:
        if not src.is_file():
            print(f"collect.py: {src} is missing: did the lab run the benchmark?", file=sys.stderr)
            return 1
        numbers |= json.loads(src.read_text())
    results = json.loads(dst.read_text()) if dst.is_file() else {}
    results[key] = numbers
    dst.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"{dst}: {key} updated from {', '.join(map(str, srcs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
