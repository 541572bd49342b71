"""Errors of the operator.

    OperatorError
    ├── SpecError          the custom resource asks for something impossible:
    │                      permanent until the user edits it (kopf.PermanentError)
    └── DependencyError    something the resource refers to is missing or not
                           ready yet (an EnginePool, a KVCache): retried later
                           (kopf.TemporaryError)

API server failures stay `kubernetes.client.ApiException`; `operators.apply`
classifies them (conflicts, 429 and 5xx are temporary).
"""

from __future__ import annotations


class OperatorError(Exception):
    """Base of the operator's own errors.

    Attributes:
        reason: the CamelCase reason written into the status condition.
    """

    reason = "Error"


class SpecError(OperatorError):
    """The spec is invalid beyond what the CRD schema can check."""

    reason = "InvalidSpec"


class DependencyError(OperatorError):
    """A referenced object does not exist (yet)."""

    reason = "DependencyMissing"
