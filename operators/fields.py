"""A small vocabulary for describing CRD fields once, in Python.

Each custom resource's spec and status are trees of `Field` values
(`operators.schema` builds them). From one tree come the CRD's structural
OpenAPI v3 schema (`openapi`), the defaults the operator applies when an API
server did not (`apply_defaults`), and the field reference table in
operators/README.md (`reference_rows`). kubebuilder projects get the same from
controller-gen and Go struct tags; this is the Python-sized equivalent.

This module knows nothing of Kubernetes clients or of kopf.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Literal

FieldType = Literal["string", "integer", "number", "boolean", "object", "array", "map", "quantity", "any-object"]


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """One field of a custom resource.

    Attributes:
        name: the JSON key.
        type: the schema type; `map` is string -> string, `quantity` is an
            int-or-string Kubernetes quantity, `any-object` keeps unknown keys
            (for embedded Kubernetes types such as tolerations).
        description: what it means, with its unit and default (the CRD shows it
            in `kubectl explain`).
        default: the value the API server fills in when absent (None: none).
        required: the parent object must have it.
        children: the properties of an `object`.
        items: the element of an `array`.
        enum: the allowed values of a string.
        minimum: the smallest allowed number.
        maximum: the largest allowed number.
        pattern: a regular expression a string must match.
        rules: CEL `x-kubernetes-validations` (rule, message) pairs on an object.
    """

    name: str
    type: FieldType
    description: str
    default: Any = None
    required: bool = False
    children: tuple[Field, ...] = ()
    items: Field | None = None
    enum: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    pattern: str | None = None
    rules: tuple[tuple[str, str], ...] = ()


def openapi(field: Field) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of `field` (recursively).

    Args:
        field: the root field (usually the spec or the status).

    Returns:
        A JSON-serialisable schema, as a CRD's `openAPIV3Schema` nests it.
    """
    schema: dict[str, Any] = {"description": field.description}
    if field.type == "map":
        schema.update(type="object", additionalProperties={"type": "string"})
    elif field.type == "quantity":
        schema.update({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]})
    elif field.type == "any-object":
        schema.update({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    elif field.type == "object":
        schema["type"] = "object"
        schema["properties"] = {child.name: openapi(child) for child in field.children}
        required = [child.name for child in field.children if child.required]
        if required:
            schema["required"] = required
    elif field.type == "array":
        assert field.items is not None, field.name
        schema.update(type="array", items=openapi(field.items))
    else:
        schema["type"] = field.type
    if field.default is not None:
        schema["default"] = copy.deepcopy(field.default)
    if field.enum:
        schema["enum"] = list(field.enum)
    if field.minimum is not None:
        schema["minimum"] = field.minimum
    if field.maximum is not None:
        schema["maximum"] = field.maximum
    if field.pattern is not None:
        schema["pattern"] = field.pattern
    if field.rules:
        schema["x-kubernetes-validations"] = [{"rule": rule, "message": message} for rule, message in field.rules]
    return schema


def apply_defaults(field: Field, value: Any) -> Any:
    """Fill in the defaults of `field` the way an API server does.

    A structural schema's defaults apply to absent properties of objects that
    are present; an object property with its own default (often `{}`) is
    created and then defaulted in turn. The operator applies them again
    because it must not depend on the API server having done so (an older
    object, or a test API server that does not default).

    Args:
        field: the schema of `value`.
        value: the value as stored (not modified).

    Returns:
        A new value with every default in place.
    """
    if value is None:
        if field.default is None:
            return None
        value = copy.deepcopy(field.default)
    if field.type == "object" and isinstance(value, Mapping):
        result = dict(value)
        for child in field.children:
            filled = apply_defaults(child, result.get(child.name))
            if filled is not None:
                result[child.name] = filled
        return result
    if field.type == "array" and isinstance(value, list) and field.items is not None:
        return [apply_defaults(field.items, item) for item in value]
    return value


def reference_rows(field: Field, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """Rows (path, type, default, description) of the field reference table.

    Args:
        field: the root field; its own row is not yielded, its descendants' are.
        prefix: the dotted path of `field`.
    """
    children = field.children if field.type == "object" else ()
    if field.type == "array" and field.items is not None and field.items.type == "object":
        children = field.items.children
        prefix = prefix + "[]"
    for child in children:
        path = f"{prefix}.{child.name}" if prefix else child.name
        kind = child.type if child.type != "array" or child.items is None else f"array of {child.items.type}"
        if child.enum:
            kind += " (" + " \\| ".join(child.enum) + ")"
        default = "" if child.default is None else f"`{_compact(child.default)}`"
        if child.required:
            default = "required"
        yield path, kind, default, child.description
        yield from reference_rows(child, path)


def _compact(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    if value == {}:
        return "{}"
    if value == []:
        return "[]"
    return str(value)
