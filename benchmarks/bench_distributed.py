"""fastadam.distributed.ZeroAdam on 1-4 local ranks, torch.distributed (gloo) and MPI: where a step's time goes.

    python benchmarks/bench_distributed.py [--elements 8388608] [--steps 10] [--ranks 1 2 3 4]
                                            [--engines torch mpi] [--bucket-mb 4]

For each engine and rank count it starts the ranks (torch: spawned processes,
gloo over loopback TCP; MPI: ``mpiexec`` of the pip-installed Open MPI, shared
memory between local ranks), builds one float32 model of ``--elements``
parameters in 8 arrays and two optimizers over it, ``overlap=False`` and
``overlap=True``, stepped alternately (same params, same gradients,
interleaved in one run), and reports, per rank (the slowest rank for times):

- serial: time per step (median over ``--steps``) split into reduce (pack
  the gradients, reduce-scatter, mean), step (the shard's fastadam call) and
  gather (all-gather into the params), and their total;
- overlapped: the total, and what it is of the serial one.  The buckets
  (``--bucket-mb`` for all ranks together; 4 MiB: 8 buckets of the default
  model) are pipelined: the reduction of bucket k+1 and the gather of
  bucket k-1 are in flight while bucket k is stepped;
- bytes sent per rank per step: the bandwidth-optimal lower bound of a
  reduce-scatter plus an all-gather, ``2 (N-1)/N`` times the model's bytes,
  and for gloo the bytes the process actually handed to the kernel's socket
  calls (``wchar`` of /proc/self/io over the steps; MPI's shared memory makes
  no system calls, so there is nothing to count);
- the optimizer state per rank (``state_nbytes()``, exactly 2/N of the
  model's bytes plus shard rounding); the bytes each optimizer holds
  (state, the kept reduced gradient of the shard, and the bucket buffer --
  two with overlap); and the resident memory the serial optimizer, built
  first, added (RSS after construction and the first step, minus before);
- for gloo, an all_reduce of the same bytes as one bucket's reduce-scatter,
  timed the same way: the fallback an engine without reduce-scatter would use.

Local ranks share this machine's cores and memory bandwidth: the times show
the costs' structure (what grows with N), not a network.  State the machine's
load beside any figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def held_bytes(opt) -> int:
    """What a ZeroAdam holds besides the params: state, the kept reduced gradient, the bucket buffer(s)."""
    buffers = {id(b): b.nbytes for b in (opt._buffer, opt._gather_buffer)}
    return opt.state_nbytes() + sum(g.nbytes for g in opt._shard_grads) + sum(buffers.values())


def measure(engine: dict, rank: int, world: int, elements: int, steps: int, bucket_bytes: int) -> dict:
    from fastadam.distributed import ZeroAdam

    sizes = [elements // 8] * 7 + [elements - 7 * (elements // 8)]
    rng = np.random.default_rng(rank)
    params = [np.full(n, 0.5, np.float32) for n in sizes]
    grads = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    opts, added = {}, {}
    for overlap in (False, True):
        before = rss_bytes()
        opts[overlap] = ZeroAdam(params, bucket_bytes=bucket_bytes, overlap=overlap, **engine)
        opts[overlap].step(grads)  # touches the state's and buffers' pages and warms the connections
        added[overlap] = rss_bytes() - before
    times: dict = {overlap: {"reduce": [], "step": [], "gather": [], "total": []} for overlap in opts}
    wchar = written_bytes()
    for k in range(steps):
        for overlap in ((False, True) if k % 2 == 0 else (True, False)):  # alternate which goes first
            opts[overlap].step(grads)
            for key, seconds in opts[overlap].last_step_seconds.items():
                times[overlap][key].append(seconds)
    wchar = (written_bytes() - wchar) / (2 * steps)
    result = {key: statistics.median(v) for key, v in times[False].items()}
    result.update(overlap_total=statistics.median(times[True]["total"]),
                  overlap_split={key: statistics.median(v) for key, v in times[True].items()},
                  buckets=sum(len(seq.buckets) for seq in opts[True]._sequences),
                  state_nbytes=opts[False].state_nbytes(), rss_added=added[False],
                  held={overlap: held_bytes(opt) for overlap, opt in opts.items()},
                  wchar_per_step=wchar)
    if "comm" not in engine and world > 1:  # gloo: the all_reduce fallback, same bytes as one bucket
        import torch
        import torch.distributed as dist

        block = opts[False]._sequences[0].block
        buf = torch.from_numpy(np.ones(world * block, np.float32))
        out = torch.empty(block)
        rs, ar = [], []
        for _ in range(steps):  # interleaved, same buffers
            t = time.perf_counter()
            dist.reduce_scatter_single(out, buf) if hasattr(dist, "reduce_scatter_single") else \
                dist.reduce_scatter_tensor(out, buf)
            rs.append(time.perf_counter() - t)
            t = time.perf_counter()
            dist.all_reduce(buf)
            ar.append(time.perf_counter() - t)
        result.update(bucket_reduce_scatter=statistics.median(rs), bucket_all_reduce=statistics.median(ar),
                      bucket_bytes=world * block * 4)
    return result


def _report(out: str, rank: int, result: dict) -> None:
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def torch_rank(rank: int, world: int, store: str, out: str, elements: int, steps: int, bucket_bytes: int) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    _report(out, rank, measure({}, rank, world, elements, steps, bucket_bytes))
    dist.destroy_process_group()


def run(engine: str, world: int, args: argparse.Namespace) -> list:
    out = tempfile.mkdtemp(prefix="bench_distributed_")
    bucket_bytes = int(args.bucket_mb * 2**20)
    try:
        if engine == "torch":
            context = multiprocessing.get_context("spawn")
            procs = [context.Process(target=torch_rank, args=(r, world, os.path.join(out, "store"), out,
                                                              args.elements, args.steps, bucket_bytes))
                     for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        else:
            mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
            env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
            subprocess.run([mpiexec, "--oversubscribe", "-n", str(world), sys.executable, __file__, "--mpi-rank",
                            out, str(args.elements), str(args.steps), str(bucket_bytes)], check=True, env=env)
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    finally:
        shutil.rmtree(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--mpi-rank":
        from mpi4py import MPI

        out, elements, steps, bucket_bytes = sys.argv[2], *map(int, sys.argv[3:6])
        comm = MPI.COMM_WORLD
        _report(out, comm.Get_rank(), measure({"comm": comm}, comm.Get_rank(), comm.Get_size(), elements, steps,
                                              bucket_bytes))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 23)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--engines", nargs="+", default=["torch", "mpi"], choices=["torch", "mpi"])
    parser.add_argument("--bucket-mb", type=float, default=4)
    args = parser.parse_args()
    model = args.elements * 4
    print(f"model: {args.elements:,} float32 parameters ({model / 2**20:.0f} MiB) in 8 arrays; unsharded Adam "
          f"state {2 * model / 2**20:.0f} MiB; bucket {args.bucket_mb:g} MiB; {args.steps} steps; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'engine':<7} {'N':>2} {'buckets':>7} | serial: {'reduce':>7} {'step':>6} {'gather':>7} {'total':>7} ms | "
          f"overlapped: {'total':>7} ms {'ratio':>5} | {'bound sent':>10} {'wchar':>6} MiB | {'state':>6} MiB | "
          f"held: {'serial':>6} {'overlap':>7} MiB | RSS added {'serial':>6} MiB | bucket: reduce_scatter vs all_reduce ms")
    for engine in args.engines:
        for world in args.ranks:
            results = run(engine, world, args)
            slowest = {key: max(r[key] for r in results) for key in ("reduce", "step", "gather", "total",
                                                                     "overlap_total")}
            bound = 2 * (world - 1) / world * model
            wchar = max(r["wchar_per_step"] for r in results)
            fallback = ""
            if "bucket_all_reduce" in results[0]:
                fallback = (f"{max(r['bucket_reduce_scatter'] for r in results) * 1e3:.1f} vs "
                            f"{max(r['bucket_all_reduce'] for r in results) * 1e3:.1f} "
                            f"({results[0]['bucket_bytes'] / 2**20:.1f} MiB)")
            buckets = results[0]["buckets"] if world > 1 else "-"  # one rank communicates nothing
            print(f"{engine:<7} {world:>2} {buckets:>7} | serial: " +
                  " ".join(f"{slowest[k] * 1e3:{w}.1f}" for k, w in
                           (("reduce", 7), ("step", 6), ("gather", 7), ("total", 7))) +
                  f" ms | overlapped: {slowest['overlap_total'] * 1e3:7.1f} ms "
                  f"{slowest['overlap_total'] / slowest['total']:5.2f} | {bound / 2**20:10.1f} "
                  f"{(wchar / 2**20 if engine == 'torch' else float('nan')):6.1f} MiB | "
                  f"{max(r['state_nbytes'] for r in results) / 2**20:6.1f} MiB | held: "
                  f"{max(r['held']['false'] for r in results) / 2**20:6.1f} "
                  f"{max(r['held']['true'] for r in results) / 2**20:7.1f} MiB | RSS added "
                  f"{max(r['rss_added'] for r in results) / 2**20:6.1f} MiB | {fallback}", flush=True)
    if max(args.ranks) > (os.cpu_count() or 1):
        print(f"note: more ranks than this machine's {os.cpu_count()} CPUs: those rows are oversubscribed")


if __name__ == "__main__":
    main()
