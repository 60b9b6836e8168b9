"""A schemathesis run of the admin API from its own OpenAPI document.

The API runs in a subprocess (``tests/fakeadmin.py``: the real Klein app over
the fake backend, on a free 127.0.0.1 port, with its own reactor); every
operation of the document gets valid and invalid requests, and every answer
must be no 500, a documented status with a documented content type, headers
and body schema; invalid input must be refused, unsupported methods answered
with 405 and Allow, and every route must ask for the token.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from fuzzing import examples
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from registryproxy.admin import openapi

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAKEADMIN = Path(__file__).parent.parent / "fakeadmin.py"

schema = schemathesis.openapi.from_dict(openapi.document())
# The token is sent by the test itself (AUTH below), so schemathesis must not
# make the Authorization header a generated parameter: a case "missing" it
# would be sent with it and then count as invalid input that was accepted.
# The ignored_auth check still sends every operation without the token.
schema.config.generation.update(with_security_parameters=False)


@pytest.fixture(scope="module")
def admin_url() -> Iterator[str]:
    server = subprocess.Popen(
        [sys.executable, str(FAKEADMIN), "--token", TOKEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on "), f"fakeadmin did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[-1])}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    """One for the whole run: connections kept alive, and no proxy settings
    read from the environment for each of the hundreds of requests."""
    with requests.Session() as session:
        session.trust_env = False
        yield session


def test_served_document_is_the_fuzzed_one(admin_url: str) -> None:
    reply = requests.get(f"{admin_url}/api/v1/openapi.json", headers=AUTH, timeout=10)
    assert reply.status_code == 200
    assert reply.json() == openapi.document()


@schema.parametrize()
# bounded: a few seconds by default (REGPROXY_FUZZ_EXAMPLES for more); no
# example database in the tree
@settings(
    max_examples=examples(5),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_from_openapi(
    case: schemathesis.Case, admin_url: str, session: requests.Session
) -> None:
    # Every other default check applies.  Schema-valid input may still be
    # refused with 400: rules across fields (tag or digest, all=true alone, an
    # image name docker would refuse, url required unless a preset) are beyond
    # what OpenAPI parameters can say, and the document describes them in words.
    case.call_and_validate(
        base_url=admin_url,
        session=session,
        headers=AUTH,
        excluded_checks=[positive_data_acceptance],
    )
