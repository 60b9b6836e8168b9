"""regproxy: a pull-through caching proxy for container registries."""
