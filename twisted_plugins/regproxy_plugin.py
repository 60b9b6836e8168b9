"""Lazy twistd plugin: importing it must stay cheap (every twistd run does)."""

from twisted.application.service import ServiceMaker

regproxy = ServiceMaker(
    "regproxy",
    "registryproxy.tap",
    "A pull-through caching proxy for container registries.",
    "regproxy",
)
