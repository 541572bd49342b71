"""Gateway errors: each renders OpenAI-shaped JSON and carries its HTTP status."""

from __future__ import annotations

import json

import pytest

from router import errors
from router.errors import GatewayError


def all_error_classes() -> list[type[GatewayError]]:
    found, todo = [], [GatewayError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


EXPECTED = {
    "GatewayError": (500, "internal_error", False),
    "RequestError": (400, "invalid_request_error", False),
    "InvalidRequest": (400, "invalid_request_error", False),
    "Unauthorized": (401, "authentication_error", False),
    "ModelNotFound": (404, "model_not_found", False),
    "PayloadTooLarge": (413, "request_too_large", False),
    "RequestTimeout": (408, "request_timeout", False),
    "UnsupportedEncoding": (415, "unsupported_media_type", False),
    "ExpectationFailed": (417, "expectation_failed", False),
    "HeadersTooLarge": (431, "request_header_fields_too_large", False),
    "UpstreamTooLarge": (502, "upstream_too_large", False),
    "OverLimit": (429, "rate_limit_exceeded", False),
    "UpstreamError": (502, "upstream_error", False),
    "UpstreamUnavailable": (502, "upstream_unavailable", True),
    "UpstreamOverloaded": (503, "service_unavailable", True),
    "NoCapacity": (503, "service_unavailable", False),
    "UpstreamTimeout": (504, "upstream_timeout", True),
}

ERRORS = [pytest.param(cls, id=cls.__name__) for cls in all_error_classes() if cls.__module__ == errors.__name__]


def test_every_error_class_has_an_expected_status():
    assert {cls.__name__ for cls in all_error_classes() if cls.__module__ == errors.__name__} == set(EXPECTED)


@pytest.mark.parametrize("cls", ERRORS)
def test_status_type_and_retryability(cls):
    assert (cls.status, cls.type, cls.retryable) == EXPECTED[cls.__name__]


@pytest.mark.parametrize("cls", ERRORS)
def test_renders_openai_shaped_json(cls):
    error = cls("something went wrong", param="messages[0].role")

    rendered = json.loads(error.to_json())

    assert rendered == {
        "error": {
            "message": "something went wrong",
            "type": cls.type,
            "param": "messages[0].role",
            "code": cls.type,
        }
    }
    assert rendered == error.body()
    assert str(error) == "something went wrong"


def test_an_explicit_code_replaces_the_type_as_code():
    error = errors.ModelNotFound("no such model", param="model", code="model_not_found_here")

    assert error.body()["error"]["code"] == "model_not_found_here"
    assert error.body()["error"]["type"] == "model_not_found"


def test_param_defaults_to_null():
    assert json.loads(errors.NoCapacity("busy").to_json())["error"]["param"] is None


def test_messages_are_escaped_as_json():
    error = errors.InvalidRequest('bad "quote" and \\ and \n newline', param="prompt")

    assert json.loads(error.to_json())["error"]["message"] == 'bad "quote" and \\ and \n newline'


@pytest.mark.parametrize(
    ("cls", "family"),
    [
        pytest.param(errors.InvalidRequest, errors.RequestError, id="invalid-is-a-request-error"),
        pytest.param(errors.Unauthorized, errors.RequestError, id="unauthorized-is-a-request-error"),
        pytest.param(errors.ModelNotFound, errors.RequestError, id="model-not-found-is-a-request-error"),
        pytest.param(errors.PayloadTooLarge, errors.RequestError, id="too-large-is-a-request-error"),
        pytest.param(errors.NoCapacity, errors.UpstreamError, id="no-capacity-is-upstream"),
        pytest.param(errors.UpstreamTimeout, errors.UpstreamError, id="timeout-is-upstream"),
        pytest.param(errors.UpstreamUnavailable, errors.UpstreamError, id="unavailable-is-upstream"),
    ],
)
def test_families_can_be_caught_together(cls, family):
    with pytest.raises(family):
        raise cls("x")

