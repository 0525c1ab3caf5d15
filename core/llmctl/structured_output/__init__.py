"""Structured output: constraints (JSON schema, regex, choice, EBNF) compiled by a grammar engine into per-step
token bitmasks that the sampler applies."""

from llmctl.structured_output.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["StructuredOutputsParams", "GuidedDecodingParams"]
