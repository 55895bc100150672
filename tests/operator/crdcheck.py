"""What the API server does with a custom resource, done offline for tests.

- :func:`apply_defaults`: structural-schema defaulting (defaults fill missing fields,
  nested objects' defaults apply inside defaulted parents).
- :func:`schema_errors`: OpenAPI v3.0 schema validation (jsonschema Draft 4 semantics,
  which is what OpenAPI 3.0's boolean ``exclusiveMinimum`` follows).
- :func:`unknown_fields`: fields the server would prune (``kubectl --validate=strict`` rejects);
  :func:`prune` drops them as the server does.
- :func:`cel_errors`: every ``x-kubernetes-validations`` rule evaluated with cel-python
  against the (defaulted) object, ``self`` bound to the node that carries the rule, with
  ``type: number`` values as doubles as Kubernetes types them.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache

import celpy
import jsonschema


def apply_defaults(schema: dict, obj):
    """Return a copy of ``obj`` with the schema's defaults filled in."""
    obj = copy.deepcopy(obj)

    def walk(s, v):
        if isinstance(v, dict) and s.get("type") == "object":
            for key, sub in (s.get("properties") or {}).items():
                if key not in v and "default" in sub:
                    v[key] = copy.deepcopy(sub["default"])
                if key in v:
                    walk(sub, v[key])
            ap = s.get("additionalProperties")
            if isinstance(ap, dict):
                for x in v.values():
                    walk(ap, x)
        elif isinstance(v, list) and s.get("type") == "array":
            for x in v:
                walk(s["items"], x)

    walk(schema, obj)
    return obj


def schema_errors(schema: dict, obj) -> list[str]:
    """Schema violations as ``path: message`` strings."""
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]


def unknown_fields(schema: dict, obj, path: str = "") -> list[str]:
    """Paths of fields the schema does not declare (outside preserve-unknown-fields nodes)."""
    out = []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        ap = schema.get("additionalProperties")
        for key, v in obj.items():
            if props is not None and key in props:
                out += unknown_fields(props[key], v, f"{path}.{key}")
            elif isinstance(ap, dict):
                out += unknown_fields(ap, v, f"{path}.{key}")
            elif props is not None:
                out.append(f"{path}.{key}")
    elif isinstance(obj, list) and schema.get("type") == "array":
        for i, v in enumerate(obj):
            out += unknown_fields(schema["items"], v, f"{path}[{i}]")
    return out


def prune(schema: dict, obj) -> list[str]:
    """Drop, in place, the fields the schema does not declare (what the API server does with
    them, outside ``x-kubernetes-preserve-unknown-fields`` nodes; ``metadata`` is the
    server's own). Returns the dropped paths."""
    dropped = []

    def walk(s, v, path):
        if s.get("x-kubernetes-preserve-unknown-fields"):
            return
        if isinstance(v, dict) and s.get("type") == "object":
            props = s.get("properties")
            ap = s.get("additionalProperties")
            for key in list(v):
                if props is not None and key in props:
                    if not (path == "" and key == "metadata"):
                        walk(props[key], v[key], f"{path}.{key}")
                elif isinstance(ap, dict):
                    walk(ap, v[key], f"{path}.{key}")
                elif props is not None and not (path == "" and key in ("apiVersion", "kind", "metadata")):
                    del v[key]
                    dropped.append(f"{path}.{key}")
        elif isinstance(v, list) and s.get("type") == "array":
            for i, x in enumerate(v):
                walk(s.get("items") or {}, x, f"{path}[{i}]")

    walk(schema, obj, "")
    return dropped


def _typed(schema: dict, v):
    # Kubernetes gives CEL a typed view: `type: number` fields are doubles even when the YAML says 5.
    if isinstance(v, dict):
        props = schema.get("properties") or {}
        ap = schema.get("additionalProperties")
        return {k: _typed(props.get(k) or (ap if isinstance(ap, dict) else {}), x) for k, x in v.items()}
    if isinstance(v, list):
        return [_typed(schema.get("items") or {}, x) for x in v]
    if schema.get("type") == "number" and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


_ENV = celpy.Environment()

_QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                   "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3}


def _quantity(text) -> celpy.celtypes.DoubleType:
    # Kubernetes' CEL quantity library (quantity(), compareTo()), as far as the CRD uses it
    t = str(text)
    for suffix in sorted(_QUANTITY_UNITS, key=len, reverse=True):
        if t.endswith(suffix):
            return celpy.celtypes.DoubleType(float(t[: -len(suffix)]) * _QUANTITY_UNITS[suffix])
    return celpy.celtypes.DoubleType(float(t))


def _compare_to(a, b) -> celpy.celtypes.IntType:
    return celpy.celtypes.IntType((a > b) - (a < b))


_FUNCTIONS = {"quantity": _quantity, "compareTo": _compare_to}


@lru_cache(maxsize=None)
def compile_rule(rule: str):
    """Compile a CEL rule to a cel-python program (raises ``celpy.CELParseError`` on bad syntax)."""
    return _ENV.program(_ENV.compile(rule), functions=_FUNCTIONS)


def is_transition_rule(rule: str) -> bool:
    """Whether the rule reads ``oldSelf`` (Kubernetes runs those on updates only)."""
    return re.search(r"\boldSelf\b", rule) is not None


def evaluate(rule: str, self_value, old_value=None) -> bool:
    """Evaluate one rule with ``self`` (and ``oldSelf``) bound; raises AssertionError when it
    does not give a bool."""
    act = {"self": celpy.json_to_cel(self_value)}
    if old_value is not None:
        act["oldSelf"] = celpy.json_to_cel(old_value)
    result = compile_rule(rule).evaluate(act)
    if not isinstance(result, (bool, celpy.celtypes.BoolType)):
        raise AssertionError(f"rule {rule!r} did not evaluate to a bool: {result!r}")
    return bool(result)


def cel_errors(schema: dict, obj, old=None) -> list[str]:
    """Messages of the rules ``obj`` violates, as ``path: message``. With ``old`` (the stored
    object, on an update) transition rules run where the node exists in both, as the API
    server runs them; without it they are skipped (a create)."""
    errors = []

    def walk(s, v, o, path):
        for r in s.get("x-kubernetes-validations") or []:
            transition = is_transition_rule(r["rule"])
            if transition and o is None:
                continue
            if not evaluate(r["rule"], _typed(s, v), _typed(s, o) if transition else None):
                errors.append(f"{path or '<root>'}: {r['message']}")
        if isinstance(v, dict) and s.get("type") == "object":
            for key, sub in (s.get("properties") or {}).items():
                if key in v:
                    walk(sub, v[key], o.get(key) if isinstance(o, dict) else None, f"{path}.{key}")
            ap = s.get("additionalProperties")
            if isinstance(ap, dict):
                for key, x in v.items():
                    walk(ap, x, o.get(key) if isinstance(o, dict) else None, f"{path}.{key}")
        elif isinstance(v, list) and s.get("type") == "array":
            for i, x in enumerate(v):  # list items have no oldSelf here (no list-map correlation)
                walk(s["items"], x, None, f"{path}[{i}]")

    walk(schema, obj, old, "")
    return errors


def all_rules(schema: dict, path: str = ""):
    """Yield ``(path, schema node, rule dict)`` for every CEL rule in the schema."""
    for r in schema.get("x-kubernetes-validations") or []:
        yield path, schema, r
    for key, sub in (schema.get("properties") or {}).items():
        yield from all_rules(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from all_rules(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from all_rules(schema["additionalProperties"], f"{path}{{}}")


_FIELD_CHAIN = re.compile(r"\bself((?:\.[A-Za-z_]\w*)+)")


def undeclared_references(rule: str, node: dict) -> list[str]:
    """``self.a.b`` chains in ``rule`` that name no declared field (what the API server's type
    check rejects when a CRD is created). A trailing method call (``.size()``) is not a field."""
    bad = []
    for m in _FIELD_CHAIN.finditer(rule):
        names = m.group(1).strip(".").split(".")
        end = m.end()
        if end < len(rule) and rule[end] == "(":  # last name is a method
            names = names[:-1]
        s = node
        for name in names:
            if s.get("x-kubernetes-preserve-unknown-fields") and not s.get("properties"):
                break
            props = s.get("properties") or {}
            if name not in props:
                if name in ("name", "generateName") and s is node.get("properties", {}).get("metadata"):
                    break  # metadata.name / generateName are visible to root rules
                bad.append(m.group(0))
                break
            s = props[name]
    return bad


def validate_custom_resource(schema: dict, obj) -> list[str]:
    """Everything the API server would reject, after defaulting: schema, CEL, unknown fields."""
    defaulted = apply_defaults(schema, obj)
    errors = schema_errors(schema, defaulted) + [f"unknown field {p}" for p in unknown_fields(schema, defaulted)]
    if errors:  # CEL runs on schema-valid objects only
        return errors
    return cel_errors(schema, defaulted)
