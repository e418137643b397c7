"""Wall time of ``stepsal eval`` on tiny-lrm: one process vs Ray with 1 and 2 workers.

    python benchmarks/scale.py [--n 64] [--max-new-tokens 128] [--batch-size 8] [--one-thread]

All conditions run in one process, one after the other, on the same problems (greedy,
``tiny:id``) and a local Ray started once with every CPU of the machine. One process
runs with torch's default thread count and with one thread; a Ray CPU worker gets as
many threads as CPUs it reserves (1 by default, or all of them). "start" is
loading the model (one process) or starting the pool (its actors load the model in
parallel); "eval" is the evaluation itself (generation, grading, writing the run
folder); "speed-up" is eval time against Ray with 1 worker and against one process.
Every condition's records must equal the one-process run's (checked). The machine's
load average is printed, since other work on the same cores skews the figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="problems")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--one-thread", action="store_true",
                        help="only the one-thread runs (the multi-thread ones are slow on a "
                             "busy machine)")
    args = parser.parse_args()

    import ray
    import torch

    from stepsal_lens import load_lrm
    from stepsal_lens.eval.runs import evaluate
    from stepsal_lens.eval.problems import load_problems
    from stepsal_lens.eval.scale import RayPool, evaluate_ray

    problems = load_problems("tiny:id", limit=args.n)
    settings = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "progress": False}
    root = Path(tempfile.mkdtemp(prefix="stepsal-scale-"))
    cpus = os.cpu_count()
    rows, load = [], [os.getloadavg()[0]]

    t0 = time.perf_counter()
    model = load_lrm("tiny-lrm", device="cpu")
    start = time.perf_counter() - t0
    threads = torch.get_num_threads()
    if args.one_thread:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    single = evaluate(model, problems, root / "single", model_name="tiny-lrm", **settings)
    if args.one_thread:
        torch.set_num_threads(threads)
        threads = 1
    rows.append(("one process", f"1 x {threads} thread{'s' * (threads > 1)}", start,
                 time.perf_counter() - t0, True))
    load.append(os.getloadavg()[0])
    if threads > 1:  # the same with one thread, as each CPU worker of Ray has
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        one = evaluate(model, problems, root / "single-1", model_name="tiny-lrm", **settings)
        rows.append(("one process", "1 x 1 thread", start, time.perf_counter() - t0,
                     one.records == single.records))
        torch.set_num_threads(threads)
        load.append(os.getloadavg()[0])

    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        for label, workers, cpus_each in (("Ray, 1 worker", 1, 1), ("Ray, 1 worker", 1, cpus),
                                          ("Ray, 2 workers", 2, 1)):
            if workers * cpus_each > cpus or (args.one_thread and cpus_each > 1):
                continue
            t0 = time.perf_counter()
            with RayPool("tiny-lrm", workers=workers, device="cpu",
                         cpus_per_worker=cpus_each) as pool:
                start = time.perf_counter() - t0
                t0 = time.perf_counter()
                run = evaluate_ray(pool, problems, root / f"ray-{workers}-{cpus_each}",
                                   **settings)
                took = time.perf_counter() - t0
            rows.append((label, f"{workers} x {cpus_each} thread{'s' * (cpus_each > 1)}",
                         start, took, run.records == single.records))
            load.append(os.getloadavg()[0])
    finally:
        ray.shutdown()

    base = next(r[3] for r in rows if r[0] == "Ray, 1 worker")
    print(f"{args.n} tiny:id problems, greedy, max_new_tokens {args.max_new_tokens}, "
          f"batch {args.batch_size}; {cpus} CPUs; load average during the runs "
          f"{min(load):.1f}-{max(load):.1f}\n")
    print("| run | workers x threads | start (s) | eval (s) | problems/s | speed-up vs "
          "Ray 1x1 | vs one process | records = one process |")
    print("|---|---|---|---|---|---|---|---|")
    for label, shape, start, took, same in rows:
        print(f"| {label} | {shape} | {start:.1f} | {took:.1f} | {args.n / took:.2f} | "
              f"{base / took:.2f}x | {rows[0][3] / took:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
