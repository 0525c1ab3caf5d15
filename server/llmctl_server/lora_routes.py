"""Serving LoRA adapters by model name: the start-up ``--lora-modules``, and, only with ``--allow-runtime-lora``,
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's routes and bodies).

A request picks an adapter through its ``model`` field; ``/v1/models`` lists every adapter with its parent. Paths
loaded at run time must lie under ``--lora-root`` after resolving symlinks, and name no ``..``, since a client
chooses them. An unloaded adapter stays alive for the requests already using it (they hold a reference).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from llmctl_server.errors import APIError, bad_request

MAX_NAME_CHARS = 256


@dataclass
class LoRAModule:
    """One ``--lora-modules`` entry: ``name=path`` or JSON ``{"name", "path", "base_model_name"}``."""

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> LoRAModule:
        text = text.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--lora-modules: not valid JSON ({exc.msg})") from None
            if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(
                    data.get("path"), str):
                raise ValueError('--lora-modules: JSON form needs {"name": ..., "path": ...}')
            return cls(data["name"], data["path"], data.get("base_model_name"))
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules: expected name=path or JSON, got {text!r}")
        return cls(name, path)


@dataclass
class LoRARegistry:
    """Adapter name -> its LoRARequest; ids are handed out once and never reused."""

    base_name: str
    adapters: dict[str, Any] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def request_for(self, model: str) -> Any:
        return self.adapters.get(model)

    def new_request(self, name: str, path: str) -> Any:
        from llmctl.lora.request import LoRARequest

        return LoRARequest(name, next(self._ids), path, self.base_name)


class LoadLoRABody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRABody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    lora_int_id: int | None = None


def confined_path(root: str, path: str) -> str:
    """``path`` (relative to ``root``, or absolute) resolved, symlinks included; refused unless inside ``root``."""
    if ".." in path.replace("\\", "/").split("/"):
        raise bad_request("lora_path: '..' is not allowed", param="lora_path")
    real_root = os.path.realpath(root)
    target = os.path.realpath(path if os.path.isabs(path) else os.path.join(real_root, path))
    if os.path.commonpath([real_root, target]) != real_root:
        raise bad_request("lora_path: must lie under --lora-root (symlinks are resolved)", param="lora_path")
    return target


def register_lora_routes(app: FastAPI, state: Any, lora_root: str) -> None:
    registry: LoRARegistry = state.loras

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRABody) -> dict[str, str]:
        if body.lora_name in registry.adapters or body.lora_name in state.model_names:
            raise bad_request(f"lora_name: {body.lora_name!r} is already loaded", param="lora_name")
        path = confined_path(lora_root, body.lora_path)
        req = registry.new_request(body.lora_name, path)
        try:
            await asyncio.to_thread(state.engine.load_lora, req)
        except ValueError as exc:
            raise bad_request(str(exc), param="lora_path") from None
        registry.adapters[body.lora_name] = req
        registry.parents[body.lora_name] = registry.base_name
        return {"status": "success", "message": f"LoRA adapter {body.lora_name!r} loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRABody) -> dict[str, str]:
        req = registry.adapters.pop(body.lora_name, None)
        if req is None:
            raise APIError(404, f"LoRA adapter {body.lora_name!r} is not loaded", param="lora_name",
                           code="model_not_found")
        registry.parents.pop(body.lora_name, None)
        state.engine.remove_lora(req.lora_int_id)
        return {"status": "success", "message": f"LoRA adapter {body.lora_name!r} unloaded"}
