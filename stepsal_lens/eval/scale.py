"""Scale-out on Ray: ``stepsal eval --ray`` and ``stepsal analyze --traces --ray``.

A :class:`RayPool` holds ``workers`` Ray actors, each with the model loaded once (on a
GPU of its own where the cluster has GPUs, ``num_gpus=1``; else on ``cpus_per_worker``
CPUs). Its :meth:`~RayPool.map` hands units of work (a chunk of problems, a trace) to
the actors, two in flight per actor, collects the results with ``ray.wait`` and passes
each to a callback in the driver. An actor that dies (killed, out of memory, its machine
gone) is replaced by a fresh one and its unfinished units run again.

:func:`evaluate_ray` is :func:`~stepsal_lens.eval.runs.evaluate` on a pool: the same
checks, the same per-problem work (:func:`~stepsal_lens.eval.runs._eval_chunk`) and the
same writer. The driver holds the run folder's lock and is its only writer
(``results.jsonl`` keyed by problem id and sample, rewritten in problem order at the
end, and ``summary.json``), so a run interrupted under Ray resumes with or without Ray,
and greedy results equal the single-process run. :func:`stepsal_lens.apps.batch.analyze_traces`
takes a pool the same way.

Ray is optional (``pip install 'stepsal-lens[ray]'``): this module imports it only
when a pool starts, and :func:`require_ray` names the fix when it is missing.

Examples
--------
>>> from stepsal_lens import StepFlowConfig
>>> from stepsal_lens.eval.problems import load_problems
>>> from stepsal_lens.eval.scale import RayPool, evaluate_ray
>>> with RayPool("tiny-lrm", workers=2) as pool:  # doctest: +SKIP
...     run = evaluate_ray(pool, load_problems("tiny:id", limit=20), "runs/ray")
...     flow = evaluate_ray(pool, load_problems("tiny:id", limit=20), "runs/ray-sf",
...                         stepflow=StepFlowConfig())

Notes
-----
Without ``address`` a pool starts a local Ray (``ray.init(address="local")``) and shuts
it down when closed; with ``address`` (``"auto"``, or ``HOST:6379``) it joins a cluster
started with ``ray start --head`` / ``ray start --address=HOST:6379`` and leaves it
running. When Ray is already initialised in the process (a notebook, the tests) the
pool uses that and leaves it as it was. Every machine of a cluster needs the same
``stepsal-lens`` installed and the model at the same path (or the same hub cache). See
``docs/scale.md``.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from stepsal_lens.errors import StepSalError

__all__ = ["ModelWorker", "RayPool", "evaluate_ray", "require_ray"]

#: Units in flight per actor (one running, one queued behind it, so no actor waits on
#: the driver between units).
IN_FLIGHT = 2


def require_ray():
    """The ``ray`` module, or a :class:`~stepsal_lens.StepSalError` naming the fix.

    Examples
    --------
    >>> require_ray().__name__  # doctest: +SKIP
    'ray'
    """
    try:
        import ray
    except ImportError:
        raise StepSalError("--ray needs Ray: pip install 'stepsal-lens[ray]'") from None
    return ray


class ModelWorker:
    """What runs inside each Ray actor: one model, loaded once, and the work run on it.

    Parameters
    ----------
    spec
        The model as the CLI takes it: ``tiny-lrm``, a local folder, a hub name or
        ``random:ARCH``.
    load_options
        ``device``, ``dtype`` and ``format`` for the loader.

    Notes
    -----
    The model is loaded on the first call (:meth:`describe` at the pool's start), so a
    loading error reaches the driver as that call's error, with its message.
    """

    def __init__(self, spec: str, load_options: dict[str, Any],
                 loader: Callable[..., Any] | None = None):
        self.spec, self.load_options, self.model = spec, dict(load_options), None
        self.loader = loader

    def _loaded(self):
        if self.model is None:
            if self.loader is None:
                from stepsal_lens.lens.models import load_lrm as loader
            else:
                loader = self.loader
            self.model = loader(self.spec, **self.load_options)
        return self.model

    def describe(self) -> dict[str, Any]:
        """Load the model (once) and say what it is and where it runs."""
        import socket

        from stepsal_lens.segments.association import info_of

        model = self._loaded()
        return {"format": info_of(model).format.name, "n_layers": model.cfg.n_layers,
                "fingerprint": info_of(model).fingerprint,
                "device": str(model.cfg.device), "host": socket.gethostname(),
                "pid": os.getpid()}

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``func(model, *args, **kwargs)``; ``func`` is a module-level function (Ray
        sends it by reference, so every machine needs the same package)."""
        return func(self._loaded(), *args, **kwargs)


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody answers at (``ray.init`` retries for minutes)."""
    import socket

    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit() or not host:
        return
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def _cause_of(err: BaseException) -> str:
    """A one-line reason from a Ray error."""
    text = str(getattr(err, "cause", None) or err).strip().splitlines()
    return text[-1] if text else type(err).__name__


class RayPool:
    """Ray actors that each hold the model once; a context manager.

    Parameters
    ----------
    model
        The model spec, as ``stepsal --model`` takes it (each actor loads it itself).
    workers
        Number of actors (default: one per GPU of the cluster, else one per
        ``cpus_per_worker`` CPUs). More than the cluster can hold is refused.
    address
        None: start a local Ray. ``"auto"`` or ``"HOST:PORT"``: join that cluster.
    device, dtype, format
        Passed to :func:`~stepsal_lens.load_lrm` in each actor. Actors take a GPU each
        (``num_gpus=1``) when the cluster has GPUs and ``device`` is not ``"cpu"``.
    cpus_per_worker
        CPUs each CPU actor reserves (Ray also sets its thread count to it).
    max_restarts
        Actor deaths tolerated per :meth:`map` before it gives up (default 3 per worker).
    loader
        A module-level function ``loader(model, device=, dtype=, format=)`` each actor
        calls to load the model (default :func:`~stepsal_lens.load_lrm`; the CLI passes
        its own, which also knows ``random:ARCH``).

    Attributes
    ----------
    actors : list
        The current actor handles (a dead one is replaced in place).
    restarts : int
        Actors replaced since the pool started.
    info : dict
        What the first actor reports: ``format``, ``n_layers``, ``device``, ``host``.

    Examples
    --------
    >>> with RayPool("tiny-lrm", workers=2) as pool:  # doctest: +SKIP
    ...     pool.info["format"], len(pool.actors)
    ('think-tags', 2)
    """

    def __init__(self, model: str | os.PathLike, *, workers: int | None = None,
                 address: str | None = None, device: str | None = None,
                 dtype: str | None = None, format: str | None = None,
                 cpus_per_worker: int = 1, max_restarts: int | None = None,
                 loader: Callable[..., Any] | None = None):
        for name, value in (("workers", workers), ("cpus_per_worker", cpus_per_worker),
                            ("max_restarts", max_restarts)):
            low = 0 if name == "max_restarts" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise StepSalError(f"{name} must be a whole number >= {low}; got {value!r}")
        self.model = str(model)
        self.address = address
        self.load_options = {"device": device, "dtype": dtype, "format": format}
        self.loader = loader
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.max_restarts = max_restarts
        self.actors: list[Any] = []
        self.restarts = 0
        self.info: dict[str, Any] = {}
        self._started_ray = False
        self._reaper: subprocess.Popen | None = None
        self._options: dict[str, Any] = {}
        self._default_cap: int | None = None  # the CLI: no more actors than units of work

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> RayPool:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> RayPool:
        """Start (or join) Ray, start the actors and load the model in each."""
        ray = require_ray()
        if self.actors:
            return self
        if not ray.is_initialized():
            try:
                _check_reachable(self.address)
                if self.address is None:
                    self._start_reaper()
                    ray.init(address="local", include_dashboard=False,
                             logging_level=logging.WARNING)
                else:
                    ray.init(address=self.address, logging_level=logging.WARNING)
            except (OSError, RuntimeError, ValueError) as err:
                self._stop_reaper()
                where = "start a local Ray" if self.address is None else \
                    f"join the Ray cluster at {self.address!r}"
                raise StepSalError(
                    f"cannot {where}: {_cause_of(err)}; start the cluster with `ray start "
                    f"--head` (and `ray start --address=HEAD:6379` on the other machines), "
                    f"or leave out --ray-address for a local Ray") from None
            self._started_ray = True
        try:
            self._plan(ray)
            self.actors = [self._new_actor(ray) for _ in range(self.workers)]
            infos = ray.get([a.describe.remote() for a in self.actors])
        except BaseException as err:
            self.close()
            raise self._translate(err, "loading the model") from None
        for key, what in (("format", "formats"), ("fingerprint", "files")):
            seen = {str(i[key]) for i in infos}
            if len(seen) > 1:
                self.close()
                raise StepSalError(f"the Ray workers loaded {self.model!r} with different "
                                   f"{what} {sorted(seen)}; install the same stepsal-lens and "
                                   f"model on every machine")
        self.info = {**infos[0], "workers": infos}
        return self

    def _plan(self, ray) -> None:
        """Resources per actor and the number of actors, checked against the cluster."""
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        device = self.load_options["device"]
        if device is not None and str(device).startswith("cuda") and gpus == 0:
            raise StepSalError(f"--device {device} but the Ray cluster has no GPU; pass "
                               f"--device cpu or join a cluster with GPUs (--ray-address)")
        if gpus and device != "cpu":
            self._options = {"num_gpus": 1}
            capacity, what = gpus, "GPU"
        else:
            self._options = {"num_cpus": self.cpus_per_worker}
            capacity, what = cpus // self.cpus_per_worker, "CPU"
        if capacity == 0:
            raise StepSalError(f"each worker needs {self.cpus_per_worker} CPUs but the Ray "
                               f"cluster has {cpus}; pass cpus_per_worker <= {cpus} or add "
                               f"machines to the cluster")
        if self.workers is None:
            self.workers = max(1, min(capacity, self._default_cap or capacity))
        if self.workers > capacity:
            need = self.workers * (1 if what == "GPU" else self.cpus_per_worker)
            raise StepSalError(f"--workers {self.workers} needs {need} {what}s but the Ray "
                               f"cluster has {gpus if what == 'GPU' else cpus}; pass --workers "
                               f"{max(1, capacity)} or add machines to the cluster")

    def _new_actor(self, ray):
        return ray.remote(ModelWorker).options(**self._options).remote(
            self.model, self.load_options, self.loader)

    def close(self) -> None:
        """Stop the actors, and the local Ray if this pool started it."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False
        self._stop_reaper()

    def _start_reaper(self) -> None:
        """Watch this driver: if it dies without :meth:`close` (SIGKILL, out of memory),
        the local Ray it started is stopped too (:mod:`stepsal_lens.eval._reaper`)."""
        if not Path("/proc").is_dir():
            return
        script = Path(__file__).with_name("_reaper.py")
        self._reaper = subprocess.Popen([sys.executable, "-I", str(script), str(os.getpid())],
                                        stdin=subprocess.PIPE, text=True,
                                        start_new_session=True)

    def _stop_reaper(self) -> None:
        if self._reaper is None:
            return
        try:
            self._reaper.stdin.write("stop\n")
            self._reaper.stdin.close()
        except OSError:  # it is gone already
            pass
        self._reaper.wait(timeout=10)
        self._reaper = None

    # ---- work --------------------------------------------------------------------------

    def _translate(self, err: BaseException, doing: str) -> BaseException:
        """A worker's StepSalError as a plain one; a dead worker named; others as they are."""
        from ray.exceptions import RayActorError, RayTaskError

        if isinstance(err, RayTaskError):
            cause = getattr(err, "cause", None)
            if isinstance(cause, StepSalError):
                return StepSalError(str(cause))
            return err
        if isinstance(err, RayActorError):
            return StepSalError(f"a Ray worker died while {doing} ({_cause_of(err)}); check "
                                f"that each worker has the memory for the model, or pass fewer "
                                f"--workers")
        return err

    def map(self, func: Callable[..., Any], units: Sequence[Any],
            on_result: Callable[[Any, Any], None], *, kwargs: dict[str, Any] | None = None,
            args_of: Callable[[Any], Iterable[Any]] | None = None) -> None:
        """Run ``func(model, *args_of(unit), **kwargs)`` for every unit on the actors.

        Parameters
        ----------
        func
            A module-level function taking the model first.
        units
            The work, in the order it is handed out.
        on_result
            ``on_result(unit, result)``, called in the driver as each result arrives
            (in completion order, not in ``units``' order).
        kwargs
            Keyword arguments for every call.
        args_of
            The positional arguments of a unit (default: the unit itself).

        Notes
        -----
        A unit whose actor dies runs again on the actor that replaces it; past
        ``max_restarts`` deaths, a :class:`~stepsal_lens.StepSalError`. An exception
        raised by ``func`` (or ``on_result``, or Ctrl-C) ends the call: the units still
        queued are cancelled, and the actors keep their model for the next call.
        """
        ray = require_ray()
        from ray.exceptions import RayActorError

        if not self.actors:
            raise StepSalError("the pool is not started; use it as `with RayPool(...) as pool:`")
        kwargs = kwargs or {}
        args_of = args_of or (lambda unit: (unit,))
        limit = 3 * len(self.actors) if self.max_restarts is None else self.max_restarts
        deaths = 0
        queue = deque(units)
        generation = [0] * len(self.actors)
        in_flight = [0] * len(self.actors)
        pending: dict[Any, tuple[int, int, Any]] = {}  # ref -> (slot, generation, unit)

        def submit(slot: int) -> None:
            while queue and in_flight[slot] < IN_FLIGHT:
                unit = queue.popleft()
                ref = self.actors[slot].call.remote(func, *args_of(unit), **kwargs)
                pending[ref] = (slot, generation[slot], unit)
                in_flight[slot] += 1

        finished = False
        try:
            for slot in range(len(self.actors)):
                submit(slot)
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                slot, gen, unit = pending.pop(ref)
                current = gen == generation[slot]
                if current:
                    in_flight[slot] -= 1
                try:
                    result = ray.get(ref)
                except RayActorError as err:
                    queue.appendleft(unit)  # runs again, first
                    if current:  # the first sign of this actor's death: replace it
                        deaths += 1
                        if deaths > limit:
                            raise StepSalError(
                                f"Ray workers died {deaths} times in this run (last: "
                                f"{_cause_of(err)}); the finished results are saved: check "
                                f"the workers' memory and run the same command to "
                                f"resume") from None
                        self._replace(ray, slot)
                        generation[slot] += 1
                        in_flight[slot] = 0
                    for s in range(len(self.actors)):
                        submit(s)
                    continue
                except Exception as err:
                    raise self._translate(err, "working") from None
                on_result(unit, result)
                submit(slot)
            finished = True
        finally:
            if not finished:
                # an error or Ctrl-C: drop the queued work (a unit already running
                # finishes unseen); the actors keep their model for the next call
                for ref in pending:
                    try:
                        ray.cancel(ref)
                    except Exception:  # finished or gone meanwhile
                        pass

    def _replace(self, ray, slot: int) -> None:
        try:
            ray.kill(self.actors[slot])
        except Exception:  # already gone
            pass
        self.actors[slot] = self._new_actor(ray)
        self.restarts += 1


def evaluate_ray(pool: RayPool | str, problems: Sequence[Any], out: str | Path, *,
                 stepflow: Any = None, max_new_tokens: int = 256, batch_size: int = 8,
                 samples: int = 1, temperature: float = 0.0, seed: int = 0,
                 model_name: str | None = None, data_name: str | None = None,
                 grading_timeout: float | int = 10.0, progress: bool = True,
                 workers: int | None = None, address: str | None = None,
                 after_result: Callable[[RayPool, int], None] | None = None):
    """:func:`~stepsal_lens.eval.runs.evaluate` with the problems spread over Ray actors.

    Parameters
    ----------
    pool
        A started :class:`RayPool`, or a model spec (a pool of ``workers`` actors on
        ``address`` is started for this call and closed afterwards).
    problems, out, stepflow, max_new_tokens, batch_size, samples, temperature, seed
        As in :func:`~stepsal_lens.eval.runs.evaluate`; the folder is the same and
        resumes with or without Ray.
    model_name
        Recorded in ``run.json`` (default: the pool's model spec).
    after_result
        Called in the driver after each chunk of records is written, with the pool and
        the number of records written in this call (monitoring; the tests kill an actor
        or interrupt the run from it).

    Returns
    -------
    EvalRun
        As :func:`~stepsal_lens.eval.runs.evaluate` returns it.

    Notes
    -----
    Problems go out in chunks of at most ``batch_size`` (fewer when there are few
    problems per worker). Greedy chunks are batched on the worker, which changes no
    row; sampled problems are seeded one by one with
    :func:`~stepsal_lens.eval.runs.sample_seed`. So the records equal the single-process
    run's, whichever worker ran them.
    """
    from tqdm.auto import tqdm

    from stepsal_lens.eval.runs import (
        _append_records,
        _check_problems,
        _eval_chunk,
        _finish_run,
        _interrupted,
        _open_results,
        _run_config,
        check_eval_settings,
        check_run_folder,
        run_identity,
    )
    from stepsal_lens.lens.models import model_fingerprint
    from stepsal_lens.results.outputs import run_folder
    from stepsal_lens.results.config import StepFlowConfig

    check_eval_settings(max_new_tokens=max_new_tokens, batch_size=batch_size, samples=samples,
                        temperature=temperature, seed=seed, grading_timeout=grading_timeout)
    _check_problems(problems)
    if stepflow is not None and not isinstance(stepflow, StepFlowConfig):
        raise StepSalError(f"stepflow must be a StepFlowConfig or None; got {stepflow!r}")
    out = Path(out)
    identity = run_identity(problems, data_name)
    spec = pool.model if isinstance(pool, RayPool) else str(pool)
    inputs = {"data": data_name, "model": spec}
    if not isinstance(pool, RayPool):
        known = {"model": model_name or str(pool), "data": data_name,
                 "stepflow": None if stepflow is None else stepflow.to_dict(),
                 "max_new_tokens": max_new_tokens, "samples": samples,
                 "temperature": temperature, "seed": seed, **identity,
                 "model_fingerprint": model_fingerprint(pool)}
        check_run_folder(out, known, inputs=inputs)  # before any actor loads the model
        with run_folder(out, command="eval", inputs=inputs), \
                RayPool(pool, workers=workers, address=address) as started:
            return evaluate_ray(started, problems, out, stepflow=stepflow,
                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                samples=samples, temperature=temperature, seed=seed,
                                model_name=model_name, data_name=data_name,
                                grading_timeout=grading_timeout, progress=progress,
                                after_result=after_result)
    sf = None if stepflow is None else stepflow.resolve(pool.info["n_layers"])
    config = _run_config(model_name or pool.model, data_name, sf, pool.info["format"],
                         max_new_tokens=max_new_tokens, samples=samples,
                         temperature=temperature, seed=seed)
    config.update(identity, model_fingerprint=pool.info.get("fingerprint"))
    check_run_folder(out, config, inputs=inputs)
    with run_folder(out, command="eval", inputs=inputs):
        done = _open_results(out, config)
        results_file = out / "results.jsonl"
        keys = [(p.id, s) for p in problems for s in range(samples)]
        todo = [(p, s) for p in problems for s in range(samples) if (p.id, s) not in done]
        size = max(1, min(batch_size, math.ceil(len(todo) / len(pool.actors))))
        chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
        bar = tqdm(total=len(todo), desc=f"evaluating ({len(pool.actors)} Ray workers)",
                   unit="problem", disable=not progress)
        n_written = 0
        try:
            with open(results_file, "a", encoding="utf-8") as f:
                def write(chunk: list, records: list[dict[str, Any]]) -> None:
                    nonlocal n_written
                    _append_records(f, done, records)
                    n_written += len(records)
                    bar.update(len(chunk))
                    if after_result is not None:
                        after_result(pool, n_written)

                pool.map(_eval_chunk, chunks, write, kwargs={
                    "sf": sf, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                    "temperature": temperature, "seed": seed,
                    "grading_timeout": grading_timeout})
        except KeyboardInterrupt:
            raise _interrupted(done, keys, results_file) from None
        finally:
            bar.close()
        return _finish_run(out, keys, done, config)


def add_ray_options(parser: Any) -> None:
    """``--ray``, ``--ray-address``, ``--workers``: the options ``eval`` and ``analyze``
    share."""
    g = parser.add_argument_group("Ray (pip install 'stepsal-lens[ray]'; docs/scale.md)")
    g.add_argument("--ray", action="store_true",
                   help="spread the work over Ray workers, each holding the model once")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (auto, or HOST:6379); default: a local Ray")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray workers (default: one per GPU, else one per CPU)")


def check_ray_options(args: Any) -> bool:
    """Refuse Ray options without ``--ray``, and ``--ray`` without Ray installed; whether
    Ray is on."""
    if not args.ray:
        given = [flag for flag, value in (("--ray-address", args.ray_address),
                                          ("--workers", args.workers)) if value is not None]
        if given:
            raise StepSalError(f"{' and '.join(given)} set Ray options but Ray is off; add "
                               f"--ray")
        return False
    if args.workers is not None and args.workers < 1:
        raise StepSalError(f"--workers must be at least 1; got {args.workers}")
    require_ray()
    return True


