"""Whether regproxy may share a repository with clients it has not authenticated.

With credentials for an upstream, regproxy can pull repositories that the
upstream serves to nobody else.  Unless the operator sets ``share_private:
true`` for that upstream, such content is served only where the upstream
would serve it to anyone: an anonymous probe (what was asked, without
credentials, with an anonymous token) decides per repository, and the verdict
is kept for a while, so a pull costs at most one probe per repository per
:data:`VERDICT_TTL`.  While the upstream is in trouble the last verdict
stands; with none, nothing is shared.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..errors import UPSTREAM_TROUBLE, RegistryError
from ..singleflight import SingleFlight

log = Logger()

#: seconds a repository's verdict (public or not) is trusted
VERDICT_TTL = 600.0
#: repositories whose verdict is remembered, per upstream
MAX_VERDICTS = 10_000

#: an anonymous probe: None if the upstream serves it to anyone, else what it
#: answers an anonymous client (raises RegistryError for upstream trouble)
Probe = Callable[[], Coroutine[Any, Any, "RegistryError | None"]]


@attrs.frozen
class _Verdict:
    refusal: RegistryError | None
    checked_at: float


class Privacy:
    def __init__(
        self, upstream: str, clock: IReactorTime, ttl: float = VERDICT_TTL, size: int = MAX_VERDICTS
    ) -> None:
        self._upstream = upstream
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._verdicts: collections.OrderedDict[str, _Verdict] = collections.OrderedDict()
        self._flight: SingleFlight[tuple[str, str], RegistryError | None] = SingleFlight()

    async def check(self, repo: str, what: str, probe: Probe) -> None:
        """Return if *repo* may be shared; raise what an anonymous client gets if not."""
        now = self._clock.seconds()
        verdict = self._verdicts.get(repo)
        if verdict is None or now - verdict.checked_at >= self._ttl:
            try:
                refusal = await self._flight.run((repo, what), probe)
            except RegistryError as e:
                if verdict is None or e.status not in UPSTREAM_TROUBLE:
                    raise
                log.warn(
                    "cannot ask {upstream} if {repo} is public ({why}); the last answer stands",
                    upstream=self._upstream,
                    repo=repo,
                    why=e.message,
                )
            else:
                if refusal is not None and refusal.status not in (401, 403):
                    raise refusal  # a 404 says nothing of the repository as a whole
                verdict = self._remember(repo, _Verdict(refusal, now))
        if verdict.refusal is not None:
            raise attrs.evolve(verdict.refusal)

    def _remember(self, repo: str, verdict: _Verdict) -> _Verdict:
        if verdict.refusal is not None and self._verdicts.get(repo, verdict).refusal is None:
            log.info(
                "{upstream}/{repo} is not public: served to nobody, as share_private is off",
                upstream=self._upstream,
                repo=repo,
            )
        self._verdicts[repo] = verdict
        self._verdicts.move_to_end(repo)
        while len(self._verdicts) > self._size:
            self._verdicts.popitem(last=False)
        return verdict
