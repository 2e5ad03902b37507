"""The checkpoint job's tensors as Ray tasks (``compress_checkpoint(..., executor="ray")``).

Each task opens the source checkpoint by path (storage every node sees), reads
one tensor by name and runs the very function a local run runs on it
(:func:`lowbit.checkpoint.pipeline.process_tensor`), with one thread. The
driver receives the results in checkpoint order and writes them with lowbit's
atomic writer, so the output file and the report's rows are byte-identical to
a local run. A task whose worker dies is retried (Ray's ``max_retries``); an
error in the data (a tensor a method refuses) is not retried and ends the job;
either way a job that cannot complete leaves no output.

Ray is optional (``pip install 'lowbit[ray]'``) and imported only here. With
no address a local cluster is started for the job and stopped after it; with
one, the job joins that cluster (``"auto"``: the one this machine belongs to).
A Ray session the caller started already is used as it is and left running.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from precision._native import thread_budget

from .chain import Chain
from .io import Checkpoint, CheckpointError

RETRIES = 3  # attempts after a worker dies mid-task; data errors are never retried


@lru_cache(maxsize=4)
def _opened(source: str, job: str) -> Checkpoint:
    """The source opened once per worker process and job (``job`` keys the cache, so a later job
    sees the files as they are then)."""
    return Checkpoint(source)


def _compress_task(source: str, job: str, name: str, reason: str | None, chain: Chain, keep_approx: bool,
                   metrics: bool) -> Any:
    from .pipeline import process_tensor

    with thread_budget(1):
        arr, c, why = process_tensor(_opened(source, job), name, reason, chain, keep_approx, metrics)
    return (arr if c is None else None), c, why  # the source array travels back only when it is kept


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError("executor='ray' needs Ray: pip install 'lowbit[ray]'") from None
    return ray


CONNECT_TIMEOUT_S = 30.0  # default wait for a Ray cluster given by address


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address (``ray://host:port`` or ``host:port``); None for ``auto`` and
    forms Ray resolves itself."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _connect(ray: Any, address: str, timeout: float, **kwargs: Any) -> None:
    """``ray.init(address=...)`` that gives up after ``timeout`` seconds: the address must accept a TCP
    connection first, and the join itself runs in a helper thread (Ray's own connection waits retry for
    many minutes and hold signals), so the caller gets one error naming the address instead of a hang."""
    hp = _host_port(address)
    if hp is not None:
        try:
            socket.create_connection(hp, timeout=timeout).close()
        except OSError as e:
            raise ConnectionError(f"Ray cluster at {address}: not reachable ({e.strerror or type(e).__name__}); "
                                  "check the address and that the cluster is up") from None
    failure: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(address=address, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            failure.append(e)

    t = threading.Thread(target=join, name="lowbit-ray-connect", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"Ray cluster at {address}: no answer within {timeout:g} s; check the address, or wait "
                           "longer (connect_timeout=, --connect-timeout)")
    if failure:
        err = failure[0]
        raise ConnectionError(f"Ray cluster at {address}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None


class RaySession:
    """Ray for one job: joins ``address`` (or starts a local cluster of ``cpus`` CPUs), and on exit
    stops only what it started. Joining gives up after ``connect_timeout`` seconds with a
    ``ConnectionError`` or ``TimeoutError`` naming the address."""

    def __init__(self, address: str | None, cpus: int, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        if not (isinstance(connect_timeout, (int, float)) and not isinstance(connect_timeout, bool)
                and 0 < connect_timeout < float("inf")):
            raise ValueError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
        self.ray = _require_ray()
        self.started = False
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                _connect(self.ray, address, float(connect_timeout), **kwargs)
            else:
                self.ray.init(num_cpus=cpus, **kwargs)
            self.started = True

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.ray.shutdown()

    def cpus(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))


def ray_in_order(source: Path, names: list[str], reasons: dict[str, str | None], chains: dict[str, Chain], keep_approx: bool,
                 metrics: bool, session: RaySession) -> Iterator[tuple[str, Any]]:
    """``(name, result)`` in the order of ``names``, computed as Ray tasks, with at most the cluster's
    CPUs plus one tasks in flight (results wait in Ray's object store until the driver writes them)."""
    ray = session.ray
    task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(_compress_task)
    job = uuid.uuid4().hex
    src = str(source.resolve())
    in_flight = session.cpus() + 1
    pending: deque = deque()
    it = iter(names)

    def submit(n: str) -> None:
        pending.append((n, task.remote(src, job, n, reasons[n], chains[n], keep_approx, metrics)))

    try:
        for n in it:
            submit(n)
            if len(pending) >= in_flight:
                break
        while pending:
            n, ref = pending.popleft()
            try:
                res = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, (CheckpointError, ValueError, OSError)):
                    raise cause from None
                raise CheckpointError(f"{source}: tensor {n!r}: the Ray task failed: {e}") from None
            except ray.exceptions.RayError as e:  # the worker died more often than it is retried, the node was lost ...
                raise CheckpointError(f"{source}: tensor {n!r}: the Ray task failed after {RETRIES} retries: "
                                      f"{type(e).__name__}") from None
            nxt = next(it, None)
            if nxt is not None:
                submit(nxt)
            yield n, res
    finally:
        for _, ref in pending:
            ray.cancel(ref, force=True)
