"""Fixtures shared by all tests. Each one owns what it starts and stops it at teardown, whether
the test passed or not; a session-wide sweep stops anything a test started by hand."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import pytest

from tests.support.backends import GunicornFlask, Handler, RawBackend
from tests.support.processes import stop_all
from tests.support.proxy import RUNNING, PorticoProcess

RawBackendFactory = Callable[[Handler], RawBackend]
PorticoFactory = Callable[..., PorticoProcess]
GunicornFactory = Callable[..., GunicornFlask]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Lets fixtures see at teardown whether the test failed (item.rep_call.failed), to print
    # the output of the processes they own.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_processes() -> Iterator[None]:
    yield
    stop_all()


@pytest.fixture(scope="module")
def flask_backends() -> Iterator[list[GunicornFlask]]:
    """Three gunicorn+Flask instances named a, b and c (sync workers), shared by a module.

    Do not stop them in a test; start your own with ``gunicorn_flask`` for that.
    """
    backends = [GunicornFlask(name) for name in ("a", "b", "c")]
    try:
        for backend in backends:  # start all, then wait: startups overlap
            backend.start(wait=False)
        for backend in backends:
            backend.wait_ready()
        yield backends
    finally:
        for backend in backends:
            backend.stop()


@pytest.fixture
def gunicorn_flask() -> Iterator[GunicornFactory]:
    """Factory: ``gunicorn_flask(name, worker_class=..., threads=...)`` -> a started
    GunicornFlask, stopped at teardown."""
    started: list[GunicornFlask] = []

    def start(name: str = "app", **kwargs: Any) -> GunicornFlask:
        backend = GunicornFlask(name, **kwargs)
        started.append(backend)
        return backend.start()

    yield start
    for backend in reversed(started):
        backend.stop()


@pytest.fixture
def raw_backend() -> Iterator[RawBackendFactory]:
    """Factory: ``raw_backend(handler)`` -> a started RawBackend, stopped at teardown."""
    started: list[RawBackend] = []

    def start(handler: Handler) -> RawBackend:
        backend = RawBackend(handler)
        started.append(backend)
        return backend.start()

    yield start
    for backend in reversed(started):
        backend.stop()


@pytest.fixture(autouse=True)
def _running_proxies_output_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Proxies owned by module-scoped fixtures outlive the test: show their recent output."""
    yield
    if _failed(request):
        for proc in list(RUNNING):
            print(f"--- {proc!r} output (tail) ---\n{proc.output()[-4000:]}")


@pytest.fixture
def portico(request: pytest.FixtureRequest) -> Iterator[PorticoFactory]:
    """Factory: ``portico(config_dict_or_toml, workers=None)`` -> a started PorticoProcess,
    stopped at teardown. Its output is printed if the test failed."""
    started: list[PorticoProcess] = []
    ready: set[int] = set()  # a failed start already put the output in its AssertionError

    def start(config: Mapping[str, Any] | str, **kwargs: Any) -> PorticoProcess:
        proc = PorticoProcess(config, **kwargs)
        started.append(proc)
        proc.start()
        ready.add(id(proc))
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()
        if id(proc) in ready and _failed(request):
            print(f"--- {proc!r} output ---\n{proc.output()}")
