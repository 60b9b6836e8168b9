"""Who may pull what: ``proxy.auth.rules`` as a decision per request."""

from __future__ import annotations

import enum

from ..config import AuthConfig, AuthRule
from ..upstream.rules import compile_pattern


class Decision(enum.Enum):
    #: refused: 401 for an anonymous client (log in), 403 for a user
    REFUSED = "refused"
    #: allowed, but only what the upstream serves to anyone: a private
    #: upstream repository stays behind its anonymous probe
    PUBLIC = "public"
    #: a rule names this user (or a group of theirs) for this repository:
    #: also what regproxy pulls with its own credentials
    NAMED = "named"


class Policy:
    def __init__(self, config: AuthConfig) -> None:
        self._config = config

    def decide(
        self, user: str | None, upstream: str, repository: str, library_prefix: bool = False
    ) -> Decision:
        """What *user* (None: anonymous) may do with *repository* of *upstream*."""
        rule = self._rule(upstream, repository, library_prefix)
        if rule is None:
            if user is not None or self._config.anonymous:
                return Decision.PUBLIC
            return Decision.REFUSED
        if user is None:
            return Decision.PUBLIC if rule.anonymous else Decision.REFUSED
        if "*" in rule.users or user in rule.users:
            return Decision.NAMED
        groups = self._config.groups
        if any(user in groups.get(group, ()) for group in rule.groups):
            return Decision.NAMED
        # a rule open to anonymous clients is open to users too
        return Decision.PUBLIC if rule.anonymous else Decision.REFUSED

    def _rule(self, upstream: str, repository: str, library_prefix: bool) -> AuthRule | None:
        for rule in self._config.rules:
            if rule.upstream not in ("*", upstream):
                continue
            for pattern in rule.repositories:
                if compile_pattern(pattern, library_prefix).matches(repository, None):
                    return rule
        return None
