"""One ``StructuredOutputsParams`` from the request forms clients use: OpenAI's ``response_format``, vLLM's
``structured_outputs`` and its older ``guided_*`` fields. Giving more than one is a 400, as is anything the
engine's static checks refuse (size caps, unsupported keywords, invalid regexes). The request may pick the
grammar engine (``guided_decoding_backend``, or ``structured_outputs.backend``)."""

from __future__ import annotations

from typing import Any

from llmctl.structured_output import StructuredOutputsParams
from llmctl.structured_output.backend import check_backend_name

from llmctl_server import protocol as p
from llmctl_server.errors import bad_request

_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def request_backend(req: p.SamplingFields) -> str | None:
    """The grammar engine this request asks for (None: the server's ``--structured-outputs-backend``)."""
    named: dict[str, str] = {}
    so_backend = req.structured_outputs.backend if req.structured_outputs is not None else None
    for name, value in (("guided_decoding_backend", req.guided_decoding_backend),
                        ("structured_outputs.backend", so_backend)):
        if value is not None:
            try:
                named[name] = check_backend_name(value, name)
            except ValueError as exc:
                raise bad_request(str(exc), param=name) from None
    if len(set(named.values())) > 1:
        fields = ", ".join(f"{k}={v!r}" for k, v in named.items())
        raise bad_request(f"guided_decoding_backend: conflicting backends ({fields})", param="guided_decoding_backend")
    return next(iter(named.values()), None)


def structured_params(req: p.SamplingFields) -> StructuredOutputsParams | None:
    backend = request_backend(req)
    forms: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        forms.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        assert rf.json_schema is not None
        schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else True
        forms.append(("response_format.json_schema.schema", {"json": schema}))
    so = req.structured_outputs
    options: dict[str, Any] = {}
    if so is not None:
        fields = so.model_dump(by_alias=True, exclude_none=True, exclude={"backend"})
        if any(fields.get(k) not in (None, False) for k in _CONSTRAINTS):
            forms.append(("structured_outputs", fields))
        else:  # options only (disable_any_whitespace, ...): as in vLLM they shape the constraint given elsewhere
            options = fields
    guided = {"json": req.guided_json, "regex": req.guided_regex, "choice": req.guided_choice,
              "grammar": req.guided_grammar}
    for kind, value in guided.items():
        if value is not None:
            forms.append((f"guided_{kind}", {kind: value}))
    if not forms:
        if so is None:
            return None
        forms.append(("structured_outputs", options))  # options and no constraint: refused below, naming it
        options = {}
    if len(forms) > 1:
        names = ", ".join(name for name, _ in forms)
        raise bad_request(f"{forms[1][0]}: give one structured-output constraint per request, got {names}",
                          param=forms[1][0])
    name, fields = forms[0]
    fields = {**options, **fields}
    if req.guided_whitespace_pattern is not None:
        fields["whitespace_pattern"] = req.guided_whitespace_pattern
    try:
        return StructuredOutputsParams(**fields, field_name=name, backend=backend)
    except ValueError as exc:
        raise bad_request(str(exc), param=name) from None
    except TypeError as exc:
        raise bad_request(f"{name}: {exc}", param=name) from None
