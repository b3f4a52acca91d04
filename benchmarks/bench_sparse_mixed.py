"""Sparse and mixed-precision step benchmarks; see fastadam._bench_sparse_mixed."""
from fastadam._bench_sparse_mixed import main

raise SystemExit(main())
