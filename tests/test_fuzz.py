"""Fuzzing the live API from its own OpenAPI schema (schemathesis): whatever a client sends,
valid or not, the service answers without a 5xx and every response conforms to the schema it
publishes.

The service runs as a real process (``python -m service``) and the schema is the one it serves at
/openapi.json, with its run-time limits and action vocabulary in it. Operations are driven one by
one through schemathesis' Hypothesis strategies (positive and negative data), with a bounded
number of examples so that the run stays well under a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from loadtest.harness import running_service

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

EXAMPLES = 25
"""Per operation and generation mode."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_and_every_response_conforms(
    tmp_path: Path, artifact_dir: Path, mode: GenerationMode
) -> None:
    env = {"IFA_STORE": "memory", "IFA_API_TOKEN": "fuzz-token"}
    with running_service(artifact_dir, tmp_path / "service.log", env=env) as service:
        schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
        operations = []
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), f"the served schema is invalid: {result}"
            operations.append(result.ok())
        labels = {operation.label for operation in operations}
        assert {"POST /rank", "POST /events", "GET /model", "GET /readyz"} <= labels
        if mode == GenerationMode.NEGATIVE:
            # Only operations that take input have invalid input to send.
            operations = [op for op in operations if op.method.upper() == "POST"]
        calls = 0
        for operation in operations:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def call(case: schemathesis.Case) -> None:
                nonlocal calls
                case.call_and_validate(base_url=service.url, checks=CHECKS)
                calls += 1

            call()
        assert calls >= len(operations) * 5
        assert service.process.poll() is None
