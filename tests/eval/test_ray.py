"""Scale-out on Ray (issue 16), on a real local Ray cluster of 2 CPUs started here.

The library tests share one pool of 2 actors (each loads tiny-lrm once). Its actors hold
the cluster's 2 CPUs while they live, so the tests of ``stepsal ... --ray`` (which start
their own actors) close it first (``free_cluster``); they come first in the file, so it
is started once.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
from safetensors.torch import load_file

from stepsal_lens import StepSalError
from stepsal_lens.apps.batch import analyze_traces
from stepsal_lens.apps.cli import main
from stepsal_lens.eval.runs import evaluate
from stepsal_lens.eval.grading import grade_output
from stepsal_lens.eval.problems import load_problems
from stepsal_lens.lens.generation import generate
from stepsal_lens.eval.scale import RayPool, evaluate_ray

TOKENS = 128  # tiny-lrm finishes these hard problems within it (86-121 tokens)
SHORT = 32  # where only equality matters, not the answers




@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def shared_pool(cluster):
    pool = RayPool("tiny-lrm", workers=2, device="cpu")
    yield pool
    pool.close()


@pytest.fixture
def pool(shared_pool):
    """The module's pool of 2 actors, started (again) if a CLI test closed it."""
    return shared_pool.start()


@pytest.fixture
def free_cluster(shared_pool):
    """The cluster's 2 CPUs free for the actors a `stepsal ... --ray` run starts."""
    shared_pool.close()


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same settings, records (in problem order) and summary."""
    assert json.loads((a / "run.json").read_text()) == json.loads((b / "run.json").read_text())
    assert _records(a) == _records(b)
    assert json.loads((a / "summary.json").read_text()) == \
        json.loads((b / "summary.json").read_text())


def test_cli_eval_two_workers_equals_single_process(free_cluster, tmp_path):
    common = ["--model", "tiny-lrm", "--data", "tiny:hard", "--limit", "4", "--max-new-tokens",
              str(TOKENS), "--device", "cpu"]
    assert main(["eval", *common, "--out", str(tmp_path / "single")]) == 0
    assert main(["eval", *common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    _same_run(tmp_path / "single", tmp_path / "ray")
    records = _records(tmp_path / "ray")
    assert [r["id"] for r in records] == [f"hard-{i}" for i in range(4)]
    # the problems are not all right or all wrong: the comparison has teeth
    assert 0 < sum(r["correct"] for r in records) < 4
    assert not (tmp_path / ".ray.stepsal-lock").exists()


@pytest.fixture(scope="module")
def traces_file(tmp_path_factory, tiny_lrm):
    """8 tiny-lrm traces of hard problems, with id and correct (some right, some wrong)."""
    problems = load_problems("tiny:hard", limit=8)
    gens = generate(tiny_lrm, [p.question for p in problems], max_new_tokens=TOKENS,
                    progress=False)
    lines = []
    for p, g in zip(problems, gens):
        summary = g.segments()["summary"] or ""
        lines.append({"id": p.id, "text": g.text,
                      "correct": grade_output(summary, p.answer).correct})
    assert 2 <= sum(x["correct"] for x in lines) <= 6
    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _same_trace_folder(single: Path, batch: Path) -> None:
    assert sorted(p.name for p in batch.iterdir()) == sorted(
        [p.name for p in single.iterdir()] + ["trace.json"])
    for name in ("steps.json", "metrics.json"):
        assert json.loads((single / name).read_text()) == json.loads((batch / name).read_text())
    a, b = (load_file(d / "step_saliency.safetensors") for d in (single, batch))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (single / "maps.png").read_bytes() == (batch / "maps.png").read_bytes()


def test_batch_analyze_equals_single_analyze_runs(free_cluster, tiny_lrm, traces_file,
                                                  tmp_path):
    lines = [json.loads(x) for x in traces_file.read_text().splitlines()]
    out = tmp_path / "batch"
    assert main(["analyze", "--model", "tiny-lrm", "--traces", str(traces_file), "--out",
                 str(out), "--device", "cpu", "--ray", "--workers", "2"]) == 0
    for line in lines:  # 8 single `stepsal analyze` runs
        trace = tmp_path / f"{line['id']}.json"
        trace.write_text(json.dumps({"text": line["text"]}))
        assert main(["analyze", "--model", "tiny-lrm", "--trace", str(trace), "--out",
                     str(tmp_path / "single" / line["id"]), "--device", "cpu"]) == 0
        _same_trace_folder(tmp_path / "single" / line["id"], out / "traces" / line["id"])
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 8 * tiny_lrm.cfg.n_layers
    assert list(metrics["trace"].unique()) == [x["id"] for x in lines]
    assert list(metrics.groupby("trace", sort=False)["correct"].first()) == \
        [x["correct"] for x in lines]
    compare = pd.read_csv(out / "compare.csv")
    assert set(compare["n_correct"]) <= {sum(x["correct"] for x in lines)}
    assert json.loads((out / "summary.json").read_text())["compared"] is True

    # resumable, also without Ray: only a missing trace is computed again, and the
    # combined files come out the same
    before = {name: (out / name).read_text() for name in
              ("metrics.csv", "compare.csv", "compare.json", "summary.json", "run.json")}
    shutil.rmtree(out / "traces" / lines[3]["id"])
    done = []
    analyze_traces(tiny_lrm, traces_file, out, model_name="tiny-lrm", progress=False,
                   after_result=lambda model, n: done.append(n))
    assert done == [1]
    _same_trace_folder(tmp_path / "single" / lines[3]["id"], out / "traces" / lines[3]["id"])
    assert {name: (out / name).read_text() for name in before} == before
    # a changed line is refused, not silently mixed in
    lines[0]["text"] += " "
    traces_file.with_name("changed.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(StepSalError, match="the traces file.s content changed"):
        analyze_traces(tiny_lrm, traces_file.with_name("changed.jsonl"), out,
                       model_name="tiny-lrm", progress=False)


def test_ray_errors_are_one_line(free_cluster, tmp_path, capsys):
    common = ["eval", "--model", "tiny-lrm", "--data", "tiny:id", "--limit", "2", "--out",
              str(tmp_path / "run")]
    assert main([*common, "--workers", "2"]) == 2
    assert "set Ray options but Ray is off; add --ray" in capsys.readouterr().err
    assert main([*common, "--ray", "--workers", "3", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stepsal: error: --workers 3 needs 3 CPUs but the Ray cluster has 2")
    assert not (tmp_path / "run").exists()
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", "tiny:id", "--limit", "2",
                 "--out", str(tmp_path / "run"), "--ray", "--workers", "1"]) == 2
    assert "neither a local folder" in capsys.readouterr().err.strip().splitlines()[-1]
    (tmp_path / "t.json").write_text("{}")
    assert main(["analyze", "--model", "tiny-lrm", "--trace", str(tmp_path / "t.json"),
                 "--out", str(tmp_path / "o"), "--ray"]) == 2
    assert "--ray is for many traces" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": "a", "text": t}) + "\n" for t in ("x", "y")))
    assert main(["analyze", "--model", "tiny-lrm", "--traces", str(bad), "--out",
                 str(tmp_path / "o")]) == 2
    assert "both name the folder 'a'" in capsys.readouterr().err
    assert not ray.is_initialized() or ray.cluster_resources()["CPU"] == 2  # left as it was


def test_sampling_is_seeded_per_problem(pool, tiny_lrm, tmp_path):
    """Sampled records do not depend on the worker, the batch or the process."""
    problems = load_problems("tiny:hard", limit=2)
    settings = {"max_new_tokens": SHORT, "temperature": 2.0, "samples": 2, "seed": 7,
                "progress": False}
    single = evaluate(tiny_lrm, problems, tmp_path / "single", model_name="tiny-lrm",
                      **settings)
    spread = evaluate_ray(pool, problems, tmp_path / "ray", batch_size=1, **settings)
    _same_run(tmp_path / "single", tmp_path / "ray")
    assert spread.records == single.records
    # the samples of a problem differ (the seed depends on the sample index)
    texts = {(r["id"], r["sample"]): r["completion"] for r in single.records}
    assert any(texts[(p.id, 0)] != texts[(p.id, 1)] for p in problems)
    assert len({r["seed"] for r in single.records}) == 4


def test_killed_worker_is_replaced_and_its_work_rerun(pool, tiny_lrm, tmp_path):
    problems = load_problems("tiny:hard", limit=6)
    single = evaluate(tiny_lrm, problems, tmp_path / "single", max_new_tokens=SHORT,
                      model_name="tiny-lrm", progress=False)
    killed, restarts = [], pool.restarts

    def kill_one(pool, n_written):
        if not killed:  # after the first problem: each actor still holds unfinished ones
            killed.append(pool.actors[0])
            ray.kill(pool.actors[0])

    run = evaluate_ray(pool, problems, tmp_path / "ray", max_new_tokens=SHORT, batch_size=1,
                       progress=False, after_result=kill_one)
    assert pool.restarts == restarts + 1 and pool.actors[0] is not killed[0]
    lines = _records(tmp_path / "ray")
    assert sorted(r["id"] for r in lines) == sorted(p.id for p in problems)  # one each
    assert run.records == single.records
    _same_run(tmp_path / "single", tmp_path / "ray")


def test_resume_a_run_interrupted_under_ray(pool, tiny_lrm, tmp_path):
    problems = load_problems("tiny:hard", limit=6)
    evaluate(tiny_lrm, problems, tmp_path / "single", max_new_tokens=SHORT,
             model_name="tiny-lrm", progress=False)

    def interrupt(pool, n_written):
        if n_written >= 2:
            raise KeyboardInterrupt

    out = tmp_path / "ray"
    with pytest.raises(KeyboardInterrupt, match=r"interrupted after 2 of 6.*resume"):
        evaluate_ray(pool, problems, out, max_new_tokens=SHORT, batch_size=1, progress=False,
                     after_result=interrupt)
    assert len(_records(out)) == 2 and not (out.parent / f".{out.name}.stepsal-lock").exists()
    assert not (out / "summary.json").exists()
    first = _records(out)
    written = []
    evaluate_ray(pool, problems, out, max_new_tokens=SHORT, batch_size=1, progress=False,
                 after_result=lambda pool, n: written.append(n))
    assert written[-1] == 4  # only the missing problems ran
    kept = {r["id"]: r for r in _records(out)}
    assert all(kept[r["id"]] == r for r in first)  # not generated again
    _same_run(tmp_path / "single", out)


def test_batch_effects_equal_stepsal_effects(pool, traces_file, tmp_path):
    first = json.loads(traces_file.read_text().splitlines()[0])
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(first) + "\n")
    analyze_traces(pool, one, tmp_path / "batch", effects=True, progress=False)
    (tmp_path / "t.json").write_text(json.dumps({"text": first["text"]}))
    assert main(["effects", "--model", "tiny-lrm", "--trace", str(tmp_path / "t.json"),
                 "--out", str(tmp_path / "single"), "--device", "cpu"]) == 0
    batch = tmp_path / "batch" / "traces" / first["id"]
    assert json.loads((batch / "effects.json").read_text()) == \
        json.loads((tmp_path / "single" / "effects.json").read_text())
    a, b = (load_file(d / "step_effects.safetensors") for d in (batch, tmp_path / "single"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_without_ray_installed(tmp_path):
    """Everything imports without Ray; --ray names the extra to install."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import stepsal_lens, stepsal_lens.eval.scale, stepsal_lens.apps.batch\n"
            "from stepsal_lens.apps.cli import main\n"
            f"sys.exit(main(['eval', '--model', 'tiny-lrm', '--data', 'tiny:id', '--out', "
            f"{str(tmp_path / 'run')!r}, '--ray']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "stepsal: error: --ray needs Ray: pip install 'stepsal-lens[ray]'"
    assert not (tmp_path / "run").exists()


def test_unreachable_cluster_is_refused_at_once(tmp_path):
    """A --ray-address nobody answers at is refused in seconds (ray.init retries for
    minutes), before anything is written."""
    code = ("import sys\nfrom stepsal_lens.apps.cli import main\n"
            f"sys.exit(main(['eval', '--model', 'tiny-lrm', '--data', 'tiny:id', '--out', "
            f"{str(tmp_path / 'run')!r}, '--ray', '--ray-address', '127.0.0.1:1']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "stepsal: error: cannot join the Ray cluster at '127.0.0.1:1': ")
    assert not (tmp_path / "run").exists()


def test_a_killed_driver_stops_the_local_ray_it_started():
    """SIGKILL of a driver runs no clean-up; the reaper it started beside its local Ray
    stops Ray's processes (GCS, raylet, dashboard and runtime-env agents, workers)."""
    import time

    from stepsal_lens.eval._reaper import _start_time, descendants

    code = ("import time\nfrom stepsal_lens.eval.scale import RayPool\n"
            "pool = RayPool('tiny-lrm', workers=1, device='cpu').start()\n"
            "print('started', flush=True)\ntime.sleep(600)\n")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          text=True) as driver:
        try:
            assert driver.stdout.readline().strip() == "started"
            time.sleep(1.5)  # the reaper records descendants every 0.5 s
            ray_processes = descendants(driver.pid)
            assert len(ray_processes) >= 4  # the reaper, GCS, raylet, agents, the worker
        finally:
            driver.kill()
            driver.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = {p for p, start in ray_processes.items() if _start_time(p) == start}
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, [open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:80]
                       for p in alive]
