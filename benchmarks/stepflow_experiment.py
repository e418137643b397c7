"""StepFlow on tiny-lrm: accuracy with and without, a tau_max x alpha sweep, and what
StepFlow does to Step-Saliency (lock-in, thinking share).

    python benchmarks/stepflow_experiment.py --n 500 --runs experiments/runs \
        --out docs/results/stepflow

Every evaluation is a resumable run folder under ``--runs`` (re-running continues);
``--out`` gets ``summary.json``, ``accuracy.csv``, ``sweep.csv``, ``saliency.csv`` and two
PNG figures. Layer split as in the paper: OEB on the bottom quarter (layer 0 of 4), SMI
on the top quarter (layer 3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stepsal_lens.segments.association import info_of

TAUS = (0.05, 0.1, 0.15, 0.3)
ALPHAS = (0.0, 0.03, 0.06, 0.12)
DEFAULT = {"tau_max": 0.15, "alpha": 0.06}
#: Far beyond the paper's settings: shows whether the hooks can move this model at all.
STRONG = {"tau_max": 0.5, "alpha": 0.5}


def _run(model, split, n, runs: Path, name, stepflow, batch_size):
    from stepsal_lens.eval.runs import evaluate
    from stepsal_lens.eval.problems import load_problems

    return evaluate(model, load_problems(f"tiny:{split}", limit=n), runs / f"{split}-{name}",
                    stepflow=stepflow, batch_size=batch_size, model_name="tiny-lrm",
                    data_name=f"tiny:{split}", progress=False)


def accuracy_table(model, n, runs, batch_size):
    import pandas as pd

    from stepsal_lens.eval.runs import compare_runs

    rows = []
    for split in ("id", "long", "hard"):
        base = _run(model, split, n, runs, "baseline", None, batch_size)
        sf = _run(model, split, n, runs, "stepflow", DEFAULT, batch_size)
        cmp = compare_runs(base, sf)
        rows.append({"split": split, "n": cmp["n"], "baseline": base.accuracy,
                     "baseline_ci95": base.summary["ci95"], "stepflow": sf.accuracy,
                     "stepflow_ci95": sf.summary["ci95"], "difference": cmp["difference"],
                     "baseline_only": cmp["a_only"], "stepflow_only": cmp["b_only"],
                     "mcnemar_p": cmp["mcnemar_p"]})
        print(f"  {split}: {base.accuracy:.3f} -> {sf.accuracy:.3f} (p={cmp['mcnemar_p']:.3g})",
              flush=True)
    return pd.DataFrame(rows)


def sweep_table(model, n, runs, batch_size, split="hard"):
    import pandas as pd

    from stepsal_lens.eval.runs import compare_runs

    base = _run(model, split, n, runs, "baseline", None, batch_size)
    rows = []
    for tau in TAUS:
        for alpha in ALPHAS:
            cfg = {"tau_max": tau, "alpha": alpha}
            name = "stepflow" if cfg == DEFAULT else f"tau{tau}-alpha{alpha}"
            run = _run(model, split, n, runs, name, cfg, batch_size)
            cmp = compare_runs(base, run)
            oeb = [r["stats"]["oeb"] for r in run.records]
            rows.append({"split": split, "tau_max": tau, "alpha": alpha,
                         "accuracy": run.accuracy, "difference": cmp["difference"],
                         "mcnemar_p": cmp["mcnemar_p"],
                         "oeb_triggers_per_trace": sum(o["triggers"] for o in oeb) / len(oeb),
                         "smi_injections_per_trace": sum(r["stats"]["smi"]["injections"]
                                                         for r in run.records) / len(oeb)})
            print(f"  tau {tau} alpha {alpha}: {run.accuracy:.3f} "
                  f"({cmp['difference']:+.3f}, p={cmp['mcnemar_p']:.3g})", flush=True)
    strong = _run(model, split, n, runs, "strong", STRONG, batch_size)
    cmp = compare_runs(base, strong)
    extra = {"split": split, **STRONG, "accuracy": strong.accuracy,
             "difference": cmp["difference"], "mcnemar_p": cmp["mcnemar_p"]}
    print(f"  strong {STRONG}: {strong.accuracy:.3f} ({cmp['difference']:+.3f})", flush=True)
    return pd.DataFrame(rows), base.accuracy, extra


def saliency_table(model, runs, n_traces):
    """Lock-in (OEB layer) and thinking share (SMI layer) on hard-split traces: plain,
    StepFlow teacher-forced on the same baseline traces, and StepFlow's own traces."""
    import pandas as pd

    from stepsal_lens.core.metrics import layer_metrics
    from stepsal_lens.lens.saliency import step_saliency
    from stepsal_lens.lens.stepflow import stepflow
    from stepsal_lens.segments.trace import Trace

    def traces(name):
        lines = (runs / f"hard-{name}" / "results.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines][:n_traces]
        fmt = info_of(model).format
        from stepsal_lens.eval.problems import load_problems

        probs = {p.id: p for p in load_problems("tiny:hard", limit=len(lines))}
        out = []
        for r in recs:
            if r["truncated"] is None or r["truncated"]:
                continue
            text = fmt.prompt(probs[r["id"]].prompt_question()) + r["completion"]
            out.append((r, Trace.from_text(text, model)))
        return out

    frames = []
    for cond, name, on in (("baseline", "baseline", False),
                           ("stepflow, same traces", "baseline", True),
                           ("stepflow, own traces", "stepflow", True)):
        for r, trace in traces(name):
            if on:
                with stepflow(model, **DEFAULT):
                    sal = step_saliency(model, trace)
            else:
                sal = step_saliency(model, trace)
            df = layer_metrics(sal)
            df.insert(0, "condition", cond)
            df.insert(1, "id", r["id"])
            df.insert(2, "correct", r["correct"])
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def plots(sweep, sal, out: Path, base_acc: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for alpha in ALPHAS:
        d = sweep[sweep.alpha == alpha]
        ax.plot(d.tau_max, 100 * d.accuracy, marker="o", label=f"alpha={alpha}")
    ax.axhline(100 * base_acc, color="k", ls="--", lw=1, label="baseline")
    ax.set_xlabel("tau_max (OEB, layer 0)")
    ax.set_ylabel("accuracy on hard split (%)")
    ax.set_title("tiny-lrm: StepFlow sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "stepflow_sweep.png", dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for ax, metric in zip(axes, ("lock_in", "thinking_share")):
        for cond, d in sal.groupby("condition", sort=False):
            m = d.groupby("layer")[metric].agg(["mean", "sem"])
            ax.errorbar(m.index, m["mean"], yerr=1.96 * m["sem"], marker="o", capsize=3,
                        label=cond)
        ax.set_xlabel("layer")
        ax.set_title(metric)
    axes[0].legend(fontsize=8)
    fig.suptitle("Step-Saliency with and without StepFlow (hard split)")
    fig.tight_layout()
    fig.savefig(out / "stepflow_saliency.png", dpi=110)


def main(argv=None):
    import torch

    from stepsal_lens import load_lrm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="problems per split")
    parser.add_argument("--runs", default="experiments/runs")
    parser.add_argument("--out", default="docs/results/stepflow")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--saliency-traces", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_lrm("tiny-lrm", device="cpu")
    t0 = time.time()
    print("accuracy, baseline vs StepFlow (paper defaults):", flush=True)
    acc = accuracy_table(model, args.n, runs, args.batch_size)
    print("sweep on the hard split:", flush=True)
    sweep, base_acc, strong = sweep_table(model, args.n, runs, args.batch_size)
    print("saliency:", flush=True)
    sal = saliency_table(model, runs, args.saliency_traces)
    acc.to_csv(out / "accuracy.csv", index=False)
    sweep.to_csv(out / "sweep.csv", index=False)
    sal.to_csv(out / "saliency.csv", index=False)
    layer_means = (sal.groupby(["condition", "layer"])[["lock_in", "context_share",
                                                          "thinking_share"]].mean().reset_index())
    summary = {"n_per_split": args.n, "default": DEFAULT, "layers": {"oeb": [0], "smi": [3]},
               "accuracy": acc.to_dict(orient="records"), "sweep": sweep.to_dict(orient="records"),
               "strong": strong,
               "saliency_layer_means": layer_means.to_dict(orient="records"),
               "saliency_traces": int(sal.groupby("condition").id.nunique().max()),
               "wall_seconds": round(time.time() - t0, 1),
               "command": "python benchmarks/stepflow_experiment.py --n %d" % args.n}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plots(sweep, sal, out, base_acc)
    print(acc.to_string(index=False))
    print(sweep.to_string(index=False))
    print(layer_means.to_string(index=False))


if __name__ == "__main__":
    main()
