"""Time decoding both Omniglot archives into the cache, and loading a split from the cache.

    python benchmarks/omniglot_cache.py            # fresh temporary cache, all cores
    python benchmarks/omniglot_cache.py --workers 1

Goals (issue 2): decoding under 30 s on 2 cores; loading from the cache under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5, help="cache loads to time")
    args = parser.parse_args(argv)

    from kshot.data.omniglot import Omniglot, build_cache

    cache = tempfile.mkdtemp(prefix="kshot-cache-bench-")
    t0 = time.perf_counter()
    build_cache(cache=cache, workers=args.workers, progress=False)
    decode_s = time.perf_counter() - t0
    loads = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        Omniglot("train", cache_dir=cache)
        loads.append(time.perf_counter() - t0)
    result = {"decode_both_archives_s": round(decode_s, 2), "workers": args.workers,
              "cache_load_s_median": round(statistics.median(loads), 4), "cache_loads_s": loads}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
