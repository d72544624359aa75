"""The side-by-side end-to-end benchmark (issue 7): `make bench`, or `make bench-quick`.

    python scripts/bench.py [--quick] [--pair base] [--out DIR] [--edge-cpus 0] [--device-cpus 1]

See vllm_tslt/bench/runner.py for what runs where; the report's first lines say how to read it.
"""

from vllm_tslt.bench.main import main

if __name__ == "__main__":
    raise SystemExit(main())
