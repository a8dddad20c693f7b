"""The DLQ copy of a poison message fits SQS's size limit, which counts message attributes too."""

from __future__ import annotations

import pytest

from deployer.agent.queue import MAX_REJECTION_REASON_CHARS, REJECTION_ATTRIBUTE, attribute_bytes, dead_letter_copy
from deployer.protocol.limits import MAX_SQS_MESSAGE_BYTES


def size(body: str, attributes: dict[str, dict[str, str]]) -> int:
    return len(body.encode()) + attribute_bytes(attributes)


def test_a_copy_that_fits_is_the_message_itself_with_the_reason() -> None:
    body, attributes = dead_letter_copy("garbage", "not JSON", "m-1")
    assert body == "garbage"
    assert attributes[REJECTION_ATTRIBUTE]["StringValue"] == "not JSON"


@pytest.mark.parametrize("filler", ["x", "é", "🙂"], ids=["ascii", "two-byte", "four-byte"])
def test_a_body_at_the_size_limit_is_cut_to_fit_with_its_attributes_and_the_reason_says_so(filler: str) -> None:
    original = filler * (MAX_SQS_MESSAGE_BYTES // len(filler.encode()))
    body, attributes = dead_letter_copy(original, "too large", "m-1")
    assert size(body, attributes) <= MAX_SQS_MESSAGE_BYTES
    assert original.startswith(body)  # cut on a character boundary, never mid-character
    assert MAX_SQS_MESSAGE_BYTES - size(body, attributes) < len(filler.encode())  # and no more than needed
    reason = attributes[REJECTION_ATTRIBUTE]["StringValue"]
    assert (
        reason
        == f"too large [body cut to {len(body.encode())} of {len(original.encode())} bytes to fit SQS's size limit]"
    )


def test_the_reason_is_bounded_so_it_can_never_crowd_out_the_body() -> None:
    _, attributes = dead_letter_copy("x", "why " * 10_000, "m-1")
    assert len(attributes[REJECTION_ATTRIBUTE]["StringValue"]) == MAX_REJECTION_REASON_CHARS
