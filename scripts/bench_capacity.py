"""The capacity benchmark: `make bench`, or `make bench-quick`.

    python scripts/bench_capacity.py [--quick] [--pair tiny] [--out DIR] [--edge-cpus 0]
        [--device-cpus 1] [--device-draft-ms-per-token MS]

See vllm_tslt/bench/capacity.py for what runs where; the report's first lines say how to read it.
"""

from vllm_tslt.bench.capacity_main import main

if __name__ == "__main__":
    raise SystemExit(main())
