"""``Options``: how every plug-in (learner, model, dataset, strategy, gossip rule) declares its
parameters: a frozen pydantic model whose fields are the scenario keys, with their defaults,
ranges and one-line descriptions. The scenario loader validates them before Ray starts;
``fedens list --long`` prints them; the plug-in reads ``self.options.<key>``.

A strategy or gossip rule built with keyword arguments (``VCA(c=0.3)``, as Flower's own
strategies are) splits them with ``split_options``: its ``Options`` fields, and the rest
(Flower's FedAvg arguments for a strategy).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Options(BaseModel):
    """No parameters; the base of every ``Options`` model. An unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def split_options(options_cls: type[BaseModel], kwargs: dict[str, Any]) -> tuple[BaseModel, dict[str, Any]]:
    """``(options_cls(**own), rest)``: the validated options from the keys of ``kwargs`` that are
    its fields, and the other keys. Raises ``ValueError`` (pydantic's ``ValidationError``) with
    one line per problem."""
    own = {k: v for k, v in kwargs.items() if k in options_cls.model_fields}
    rest = {k: v for k, v in kwargs.items() if k not in options_cls.model_fields}
    try:
        return options_cls.model_validate(own), rest
    except ValidationError as err:  # one line, not pydantic's block
        raise ValueError(first_error(err, own)) from None


def first_error(err: ValidationError, raw: Any, prefix: str = "") -> str:
    """The first problem of ``err`` as ``"key.path: what is wrong"``, the key path as the user
    wrote it (``raw``) under ``prefix``, for one error line such as ``x.yaml:
    strategy.params.mu: should be greater than or equal to 0``."""
    e = err.errors()[0]
    path = ".".join(p for p in (prefix, key_path(raw, e["loc"])) if p)
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "union_tag_invalid":
        msg = f"unknown kind {e['input'].get('kind')!r}; expected one of {e['ctx']['expected_tags']}"
    elif e["type"] == "union_tag_not_found":
        msg = "missing 'kind'"
    else:
        msg = msg[0].lower() + msg[1:]
        msg = msg.replace("input should be", "should be").removeprefix("value error, ")
    if e["type"] == "value_error" and not e["loc"]:  # a check across fields: its message names the keys
        return f"{prefix}.{msg}" if prefix else msg
    return f"{path or '(top level)'}: {msg}"


def key_path(raw: Any, loc: tuple[Any, ...]) -> str:
    """Pydantic's error location as a dotted key path of the user's YAML.

    Discriminated unions add the tag (e.g. ``dirichlet``) to the location; it is not a key the
    user wrote, so it is dropped by walking the raw input alongside the location.
    """
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, dict) and node.get("kind") == item:
            continue  # union tag
        else:
            parts.append(str(item))
            node = None
    return ".".join(parts)


def describe(options_cls: type[BaseModel]) -> str:
    """``key=default`` of every field with a default, for ``fedens list``."""
    out = []
    for key, f in options_cls.model_fields.items():
        if f.default_factory is not None:
            out.append(f"{key}={f.default_factory()!r}")
        elif not f.is_required():
            out.append(f"{key}={f.default!r}")
    return ", ".join(out)
