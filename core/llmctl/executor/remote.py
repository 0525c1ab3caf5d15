"""The driver's side of an executor whose ranks live in other processes (``mp``, ``ray``): what ``LLMEngine``
needs of an ``EngineCore``, with the model and the scheduler held by the ranks.

The driver keeps no model and no scheduler. It queues the frontend's request changes (adds, aborts, stops) and
sends them with each step to every rank, which all step in lockstep (see ``llmctl.executor.worker``); rank 0
returns the step's outputs. A transport failure (a rank that exits, reports an error or does not answer within
the step timeout) ends the engine with ``EngineDeadError``, and every rank is stopped.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from llmctl.config import EngineArgs
from llmctl.engine.errors import EngineDeadError
from llmctl.engine.request import Request, RequestStatus
from llmctl.executor import messages as msg
from llmctl.executor import step_codec

logger = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT_S = 300.0
DEFAULT_START_TIMEOUT_S = 1800.0  # loading a large checkpoint from a slow disk


class RemoteCore:
    lora: Any = None  # with enable_lora: a LoRAHostCache that checks adapters against rank 0's full shapes

    def __init__(self, args: EngineArgs) -> None:
        from llmctl.engine.startup import check_tensor_parallel
        from llmctl.loader.model_loader import get_model_class
        from llmctl.loader.source import resolve_model
        from llmctl.plugins import get_plugin_manager
        from llmctl.quantization import resolve_quant_config

        self.args = args
        self.world_size = args.world_size
        self._step_timeout = msg.env_seconds(msg.STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT_S)
        self._start_timeout = msg.env_seconds(msg.START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)
        # Downloaded and checked here, once, so a bad topology fails before any rank starts and local ranks find
        # the checkpoint already in the cache.
        self.source = resolve_model(args.model, args.revision, args.trust_remote_code, args.download_dir,
                                    args.hf_overrides)
        registry = get_plugin_manager().registry
        model_cls = get_model_class(self.source.hf_config, registry, args.model_impl)
        check_tensor_parallel(args, self.source.hf_config, model_cls, resolve_quant_config(args.quantization,
                                                                                             self.source))
        self._pending: list[msg.Op] = []
        self._unfinished: set[str] = set()
        self._dead: str | None = None
        self._stats: dict[str, Any] = {}

    def _set_info(self, info: dict[str, Any]) -> None:
        self.model_config = info["model_config"]
        self.cache_config = info["cache_config"]
        self.scheduler_config = info["scheduler_config"]
        self.runner_type = info["runner_type"]
        self._stats = info["stats"]
        if info.get("lora") is not None:
            from llmctl.lora.manager import LoRAHostCache

            self.lora = LoRAHostCache(self.args.lora_config(), *info["lora"])

    # -- the transport (subclasses) ------------------------------------------------------------------------------
    def _send(self, payload: bytes) -> None:
        """Send one encoded step message (``llmctl.executor.step_codec``) to every rank; raise ``RuntimeError``,
        ``TimeoutError`` or ``OSError`` when a rank is dead or does not take it."""
        raise NotImplementedError

    def _receive(self) -> tuple[Any, ...]:
        """Rank 0's reply to the last message; raise as ``_send`` does when a rank is dead, failing or silent."""
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _die(self, exc: BaseException) -> EngineDeadError:
        self._dead = f"engine workers died: {exc}"
        logger.error("llmctl executor: %s; stopping every rank", self._dead)
        self.shutdown()
        return EngineDeadError(self._dead)

    def begin(self, kind: str) -> None:
        """Send the queued request changes and ``kind`` (a step or a sync) without waiting for the answer, so a
        caller driving several engines (data parallelism) lets them all work at once; ``end`` collects it."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        ops, self._pending = self._pending, []
        try:
            payload = encode_ops(kind, ops)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            # check_sendable refuses what it knows cannot travel; anything else would leave the driver waiting
            # for requests the ranks never got, so the engine ends instead of hanging
            raise self._die(RuntimeError(f"a step message could not be encoded for the ranks: {exc}")) from exc
        try:
            self._send(payload)  # once for every rank
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise self._die(exc) from exc

    def end(self) -> list[Any]:
        try:
            reply = self._receive()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise self._die(exc) from exc
        _, outputs, self._stats = reply
        for out in outputs:
            if out.finish_reason is not None:
                self._unfinished.discard(out.request_id)
        return outputs

    def _round_trip(self, kind: str) -> list[Any]:
        self.begin(kind)
        return self.end()

    @property
    def num_unfinished(self) -> int:
        return len(self._unfinished)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    # -- the EngineCore surface LLMEngine uses -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        step_codec.check_sendable(request)
        # Consecutive adds travel in one list, so requests of one n-group keep pointing at the same leader.
        if self._pending and self._pending[-1][0] == msg.ADD:
            self._pending[-1][1].append(request)
        else:
            self._pending.append((msg.ADD, [request]))
        request.grammar = None  # each rank compiles its own (llmctl.executor.worker._Grammars)
        if request.lora is not None:  # each rank reads its own slices of the adapter: only its name travels
            request.lora = request.lora.request
        self._unfinished.add(request.request_id)

    def abort(self, request_ids: list[str]) -> None:
        self._pending.append((msg.ABORT, list(request_ids)))
        self._unfinished.difference_update(request_ids)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        self._pending.append((msg.FINISH, request_id, status))
        self._unfinished.discard(request_id)

    def has_unfinished(self) -> bool:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        return bool(self._unfinished)

    def step(self) -> list[Any]:
        return self._round_trip(msg.STEP)

    def get_stats(self) -> dict[str, Any]:
        if self._pending and self._dead is None:  # aborts and stops change the block counts: apply them first
            self._round_trip(msg.SYNC)
        return dict(self._stats)

    def max_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.args.block_size)

    def shutdown(self) -> None:
        self._stop()


def encode_ops(kind: str, ops: list[msg.Op]) -> bytes:
    """The queued ``(ADD | ABORT | FINISH, ...)`` tuples as one typed step message."""
    typed: list[step_codec.Op] = []
    for op in ops:
        if op[0] == msg.ADD:
            typed.append(step_codec.add_op(op[1]))
        elif op[0] == msg.ABORT:
            typed.append(step_codec.AbortOp(list(op[1])))
        else:
            typed.append(step_codec.FinishOp(op[1], op[2]))
    return step_codec.encode_step(kind, typed)
