"""Integration tests: real docker-registry, regproxy under twistd, real clients."""
