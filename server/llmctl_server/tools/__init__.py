"""Tool calling: request checks and constraints (``choice``), model-output parsers (``parsers``)."""
