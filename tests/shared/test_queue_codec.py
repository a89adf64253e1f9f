"""The queue's JSON codec (hardening F2) through arq's own job and result functions: what Pendra
enqueues and what a fetcher stores round-trip as JSON, failures come back as text, and a pickle
planted in their place is refused without running."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from arq.jobs import (
    DeserializationError,
    SerializationError,
    deserialize_job_raw,
    deserialize_result,
    serialize_job,
    serialize_result,
)
from arq.worker import JobExecutionFailed
from pendra_shared.jobs import INSTALL_FUNCTION, UNINSTALL_FUNCTION
from pendra_shared.queue_codec import EXCEPTION_KEY, JobFailed, dumps, loads

from tests.conftest import gemma_entry

NOW_MS = 1_700_000_000_000


class Planted:
    """A pickle that, once unpickled, runs `touch marker`: what an attacker with Redis access
    would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def planted_job(marker: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """A pickled arq job whose only argument runs `touch marker` when unpickled."""
    job = {"t": 1, "f": UNINSTALL_FUNCTION, "a": [Planted(marker)], "k": {}, "et": NOW_MS}
    return pickle.dumps(job, protocol=protocol)


def _result(result: Any, success: bool) -> bytes | None:
    return serialize_result(
        UNINSTALL_FUNCTION, ("ghost:1",), {}, 1, NOW_MS, success, result, NOW_MS, NOW_MS + 5,
        "ref", "pendra:queue", "job-1", serializer=dumps,
    )  # fmt: skip


def test_the_planted_payload_is_live(tmp_path: Path) -> None:
    """The payload the other tests plant does run when unpickled, so its marker staying absent
    there means it was refused, not that it was harmless."""
    marker = tmp_path / "ran"
    pickle.loads(planted_job(marker))  # noqa: S301 - the point of the test
    assert marker.exists()


def test_an_install_job_round_trips_as_json() -> None:
    entry = gemma_entry("https://models.example/gemma.gguf")
    raw = serialize_job(
        INSTALL_FUNCTION, ("install:gemma3:270m", "abc123", entry), {}, None, NOW_MS, serializer=dumps
    )
    assert json.loads(raw)["a"] == ["install:gemma3:270m", "abc123", entry]
    function, args, kwargs, job_try, enqueued = deserialize_job_raw(raw, deserializer=loads)
    assert (function, list(args), kwargs, job_try, enqueued) == (
        INSTALL_FUNCTION,
        ["install:gemma3:270m", "abc123", entry],
        {},
        None,
        NOW_MS,
    )


def test_arguments_that_are_not_json_are_refused_at_enqueue() -> None:
    with pytest.raises(SerializationError, match="unable to serialize job"):
        serialize_job(UNINSTALL_FUNCTION, ({"a", "set"},), {}, None, NOW_MS, serializer=dumps)


def test_a_result_round_trips_and_a_failure_comes_back_as_text() -> None:
    outcome = {"ok": False, "code": "model_not_found", "message": "'ghost:1' is not in the store"}
    done = deserialize_result(_result(outcome, True) or b"", deserializer=loads)
    assert done.success and done.result == outcome

    raw = _result(JobExecutionFailed("function 'x' not found"), False)
    assert raw is not None
    stored = json.loads(raw)["r"]
    assert stored == {EXCEPTION_KEY: {"type": "JobExecutionFailed", "message": "function 'x' not found"}}
    failed = deserialize_result(raw, deserializer=loads)
    assert not failed.success
    assert isinstance(failed.result, JobFailed) and isinstance(failed.result, Exception)
    assert (failed.result.kind, failed.result.message) == ("JobExecutionFailed", "function 'x' not found")
    assert str(failed.result) == "JobExecutionFailed: function 'x' not found"


def test_a_cancelled_or_timed_out_job_comes_back_as_a_plain_failure() -> None:
    for error, kind in ((asyncio.CancelledError(), "CancelledError"), (TimeoutError(), "TimeoutError")):
        result = deserialize_result(_result(error, False) or b"", deserializer=loads).result
        # A plain Exception: a reader that raises it is not itself cancelled or timed out.
        assert type(result) is JobFailed and result.kind == kind and str(result) == kind


def test_a_result_that_is_not_json_is_stored_as_arqs_plain_failure() -> None:
    raw = _result(object(), True)
    assert raw is not None
    back = deserialize_result(raw, deserializer=loads)
    assert (back.success, back.result) == (False, "unable to serialize result")


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickled_job_or_result_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "ran"
    payload = planted_job(marker, protocol)
    with pytest.raises(DeserializationError, match="unable to deserialize job"):
        deserialize_job_raw(payload, deserializer=loads)
    with pytest.raises(DeserializationError, match="unable to deserialize job result"):
        deserialize_result(payload, deserializer=loads)
    assert not marker.exists()


@pytest.mark.parametrize(
    "raw",
    [
        b"[1, 2]",
        b'"text"',
        b"\xff\xfe",
        b'{"r": {"__pendra_exception__": "os.system"}, "s": false}',
        b'{"r": {"__pendra_exception__": {"type": 1, "message": "m"}}, "s": false}',
    ],
    ids=["array", "string", "not utf-8", "failure not an object", "failure type not text"],
)
def test_what_dumps_never_writes_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        loads(raw)
