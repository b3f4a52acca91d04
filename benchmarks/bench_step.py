"""Benchmark the Adam step against the bandwidth limit and its peers (see fastadam/_bench.py).

    python benchmarks/bench_step.py [--quick] [--help]
"""
from fastadam._bench import main

raise SystemExit(main())
