"""The engine core's side of speculative decoding: asks the proposer for draft tokens after each step and
keeps the acceptance counters that ``get_stats()`` and ``/metrics`` report."""

from __future__ import annotations

from dataclasses import dataclass

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
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            # tokens a request gains per verified step (accepted drafts + the one sampled token)
            "spec_mean_tokens_per_step": (self.num_accepted_tokens + rows) / rows if rows else 0.0,
        }


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.stats = SpecDecodeStats()

    def num_drafts_allowed(self, req: Request) -> int:
        """Never draft past max_tokens or the context: the drafts plus the one sampled token must fit."""
        return max(0, min(self.config.num_speculative_tokens, req.max_tokens - req.num_output_tokens - 1,
                          self.max_model_len - req.num_tokens - 1))

    def propose(self, running: list[Request]) -> None:
        """Draft tokens for every running request that is decoding (all its tokens but the last computed)."""
        for req in running:
            if req.finished or req.num_tokens - req.num_computed_tokens != 1:
                req.spec_token_ids = []
                continue
            req.spec_token_ids = self.proposer.propose(req.all_token_ids, self.num_drafts_allowed(req))

    def record(self, num_rows: int, num_draft: int, num_accepted: int) -> None:
        self.stats.num_verify_rows += num_rows
        self.stats.num_draft_tokens += num_draft
        self.stats.num_accepted_tokens += num_accepted
