from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.errors import InvalidRequestError, RateLimitError, from_body
from shared.schemas import JobCreate


def body(**extra):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_minimal_and_full_requests():
    assert JobCreate.model_validate(body()).max_new_tokens is None
    req = JobCreate.model_validate(
        body(
            messages=[
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}, "uuid": "u1"},
                        {"type": "image_url", "image_url": None, "uuid": "u2"},
                    ],
                },
            ],
            max_tokens=5,
            max_completion_tokens=7,
            temperature=0.5,
            top_p=0.9,
            seed=3,
            stop="END",
            metadata={"a": "b"},
        )
    )
    assert req.max_new_tokens == 7
    assert req.stop == ["END"]
    assert [p for p, _ in req.media_parts()] == ["messages[1].content[1]", "messages[1].content[2]"]


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": True},
        {"n": 2},
        {"temperature": 3},
        {"max_tokens": 0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"unknown_field": 1},
        {"messages": []},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": None}]}]},
        {"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"metadata": {str(i): "v" for i in range(17)}},
    ],
)
def test_invalid_requests(extra):
    with pytest.raises(ValidationError):
        JobCreate.model_validate(body(**extra))


def test_stored_errors_keep_type_and_status():
    err = from_body({"message": "m", "type": "invalid_media", "param": "p", "code": "c"}, "x")
    assert (err.status_code, err.type, err.param, err.code) == (400, "invalid_media", "p", "c")
    assert from_body(None, "fallback").status_code == 500
    assert from_body({"type": "rate_limit_error", "message": "slow"}, "x").status_code == 429
    assert InvalidRequestError("m", param="x").to_response() == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "x", "code": None}
    }
    assert RateLimitError("slow", retry_after=3).retry_after == 3
