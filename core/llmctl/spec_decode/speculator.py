"""The engine core's side of speculative decoding: asks the proposer for draft tokens after each step and
keeps the acceptance counters that ``get_stats()`` and ``/metrics`` report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmctl.engine.request import Request
from llmctl.spec_decode.config import SpeculativeConfig
from llmctl.spec_decode.ngram_proposer import NgramProposer


@dataclass
class SpecDecodeStats:
    num_verify_rows: int = 0  # request-steps that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        rows = self.num_verify_rows
        return {
            "spec_num_verify_rows": rows,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            # tokens a request gains per verified step (accepted drafts + the one sampled token)
            "spec_mean_tokens_per_step": (self.num_accepted_tokens + rows) / rows if rows else 0.0,
        }


class Speculator:
    """``draft`` (a DraftModelProposer or an EagleProposer) drafts for the whole batch at once; without one,
    ``proposer`` drafts per request from its tokens (prompt lookup)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft: Any = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.draft = draft
        self.stats = SpecDecodeStats()

    def num_drafts_allowed(self, req: Request) -> int:
        """Never draft past max_tokens or the context: the drafts plus the one sampled token must fit. A request
        whose grammar still waits for the end of its reasoning does not draft (the constraint starts mid-draft)."""
        if req.grammar is not None and (req.grammar.waiting or req.grammar.terminated):
            return 0
        return max(0, min(self.config.num_speculative_tokens, req.max_tokens - req.num_output_tokens - 1,
                          self.max_model_len - req.num_tokens - 1))

    def propose(self, running: list[Request]) -> None:
        """Draft tokens for every running request that is decoding (all its tokens but the last computed), unless
        ``disable_by_batch_size`` or more of them are."""
        todo: list[tuple[Request, int]] = []
        for req in running:
            req.spec_token_ids = []
            if not req.finished and req.num_tokens - req.num_computed_tokens == 1:
                todo.append((req, self.num_drafts_allowed(req)))
        limit = self.config.disable_by_batch_size
        if limit is not None and len(todo) >= limit:
            return  # a batch this large decodes faster without drafts
        if self.draft is not None:
            for (req, _), draft in zip(todo, self.draft.propose(todo), strict=True):
                req.spec_token_ids = draft
        else:
            for req, k in todo:
                req.spec_token_ids = self.proposer.propose(req.all_token_ids, k)
        for req, _ in todo:  # structured output: drafts the grammar rejects are cut before verification
            if req.grammar is not None and req.spec_token_ids:
                req.spec_token_ids = req.grammar.draft_prefix(req.spec_token_ids)

    @property
    def wants_hidden(self) -> bool:
        """Whether the proposer reads the target's hidden states (EAGLE) after each step."""
        return bool(getattr(self.draft, "wants_hidden", False))

    def observe(self, sched: Any, batch: Any, hidden: Any) -> None:
        self.draft.observe(sched, batch, hidden)

    def record(self, num_rows: int, num_draft: int, num_accepted: int) -> None:
        self.stats.num_verify_rows += num_rows
        self.stats.num_draft_tokens += num_draft
        self.stats.num_accepted_tokens += num_accepted
