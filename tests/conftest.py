import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

# pytest keeps the test modules it rewrote for assertions, and Python the
# modules it compiled, as bytecode beside them; where the environment says
# not to (PYTHONDONTWRITEBYTECODE), every pytest process compiled the tests,
# regproxy and hypothesis again: about 4 s each, in each process of a run.
sys.dont_write_bytecode = False
sys.path.insert(0, str(Path(__file__).parent))

from fakeregistry import FakeRegistry  # noqa: E402

#: The directories whose files take longest go out first.  In several
#: processes (``-n 4 --dist loadfile``, files in collection order) each
#: takes the next file when it is free, so the many short unit files fill in
#: at the end,
#: where a 20 s file (the dashboard's, collected last by name) ran alone.
SLOWEST_FIRST = ("cluster", "integration", "web")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent

    def rank(item: pytest.Item) -> int:
        top = item.path.relative_to(here).parts[0] if item.path.is_relative_to(here) else ""
        return SLOWEST_FIRST.index(top) if top in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: a directory's own order is kept


@pytest.fixture
def logged() -> Iterator[list[Any]]:
    """The log events emitted during the test (twisted.logger's)."""
    from twisted.logger import globalLogPublisher

    events: list[Any] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.async_yield_fixture()
async def fake_registry() -> AsyncIterator[FakeRegistry]:
    """A started FakeRegistry without auth; stopped after the test."""
    registry = await FakeRegistry.start()
    yield registry
    await registry.stop()


@pytest_twisted.async_yield_fixture()
async def make_fake_registry() -> AsyncIterator[Callable[..., Awaitable[FakeRegistry]]]:
    """``await make_fake_registry(auth="bearer", ...)``: FakeRegistry.start, stopped after."""
    started: list[FakeRegistry] = []

    async def make(**kwargs: Any) -> FakeRegistry:
        started.append(await FakeRegistry.start(**kwargs))
        return started[-1]

    yield make
    for registry in started:
        await registry.stop()


@pytest_twisted.async_yield_fixture()
async def make_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await make_proxy(registry_url, cache={...}, **upstream_keys)``: a running regproxy.

    It retries a failed upstream connection after 10 and 40 ms rather than
    0.2 and 0.8 s (those pauses are tested on a Clock in test_upstream_limits),
    so that a test of an unreachable upstream does not wait a second a request."""
    from proxyharness import start_proxy

    from registryproxy.upstream.client import RegistryClient

    monkeypatch.setattr(RegistryClient, "RETRY_DELAYS", (0.01, 0.04))
    started: list[Any] = []

    async def make(url: str, cache_dir: Path | None = None, **kwargs: Any) -> Any:
        proxy = await start_proxy(url, cache_dir or tmp_path / "cache", **kwargs)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        await proxy.stop()
