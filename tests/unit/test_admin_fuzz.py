"""A schemathesis run of the admin API from its own OpenAPI document.

The API runs in a subprocess (``tests/fakeadmin.py``: the real Klein app over
the fake backend, on a free 127.0.0.1 port, with its own reactor), and so does
schemathesis's own command line, on the document the API serves.
Every operation gets its examples, the coverage phase's valid and invalid
values and generated requests; every answer must be no 500, a documented
status with a documented content type, headers and body schema; invalid input
must be refused, unsupported methods answered with 405 and Allow, and every
route must ask for the token.

The command line rather than schemathesis's pytest plugin: the plugin builds
its tests while every pytest process collects, which cost each process about
5 s, the tests it never ran included (and under ``--dist loadfile`` xdist ran
one of its 25 same-named tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fuzzing import examples

from registryproxy.admin import openapi

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAKEADMIN = Path(__file__).parent.parent / "fakeadmin.py"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


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


def test_served_document_is_the_fuzzed_one(admin_url: str) -> None:
    reply = requests.get(f"{admin_url}/api/v1/openapi.json", headers=AUTH, timeout=10)
    assert reply.status_code == 200
    assert reply.json() == openapi.document()


def schemathesis_run(
    document: dict[str, Any], admin_url: str, tmp_path: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    """Run schemathesis on *document* (from a file: when it reads the served
    one, it leaves the document's own operation out) against *admin_url*."""
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(document))
    return subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            str(path),
            "--url",
            admin_url,
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--no-color",
            *options,
        ],
        # and its cache of failures in a directory of the test's own, so
        # that no run replays another's
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_api_from_openapi(admin_url: str, tmp_path: Path) -> None:
    run = schemathesis_run(
        openapi.document(),
        admin_url,
        tmp_path,
        # Every other check applies.  Schema-valid input may still be refused
        # with 400: rules across fields (tag or digest, all=true alone, an
        # image name docker would refuse, url required unless a preset) are
        # beyond what OpenAPI parameters can say, and the document describes
        # them in words.
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "examples,coverage,fuzzing",
        # bounded: a few seconds by default (REGPROXY_FUZZ_EXAMPLES for more)
        "--max-examples",
        str(examples(5)),
        "--suppress-health-check",
        "all",
        "--generation-database",
        "none",
        # The token is sent with every request (--header), so schemathesis
        # must not make the Authorization header a generated parameter: a
        # case "missing" it would be sent with it and then count as invalid
        # input that was accepted.  The ignored_auth check still sends every
        # operation without the token.
        "--generation-with-security-parameters",
        "false",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # The run really tested the API: every operation of the document.
    operations = sum(
        method in METHODS for item in openapi.document()["paths"].values() for method in item
    )
    assert f"Tested: {operations}" in run.stdout, run.stdout


def test_the_run_fails_when_an_answer_breaks_the_document(admin_url: str, tmp_path: Path) -> None:
    """The run above can fail: its response schema check, against a
    document that promises a stats field the API does not answer, says so."""
    document = openapi.document()
    stats = document["components"]["schemas"]["Stats"]
    stats["properties"]["promised"] = {"type": "string"}
    stats["required"] = [*stats.get("required", []), "promised"]
    run = schemathesis_run(
        document,
        admin_url,
        tmp_path,
        "--include-operation-id",
        "stats",
        "--checks",
        "response_schema_conformance",
        "--phases",
        "examples,fuzzing",
        "--max-examples",
        "1",
    )
    assert run.returncode != 0, run.stdout
    assert "promised" in run.stdout, run.stdout
