"""Who a client of the /v2/ port is, and what it may pull (``proxy.auth``)."""
