"""How many examples a property test tries.

Few by default, so that the unit suite stays fast; ``REGPROXY_FUZZ_EXAMPLES=N``
makes every property test (hypothesis, schemathesis, random seeds) try N, for a
thorough run: ``REGPROXY_FUZZ_EXAMPLES=2000 pytest tests/unit -k 'rules or fuzz'``.
"""

from __future__ import annotations

import os


def examples(default: int) -> int:
    """*default*, unless ``REGPROXY_FUZZ_EXAMPLES`` says how many."""
    value = os.environ.get("REGPROXY_FUZZ_EXAMPLES", "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"REGPROXY_FUZZ_EXAMPLES: expected a number >= 1, not {value!r}")
    return int(value)
