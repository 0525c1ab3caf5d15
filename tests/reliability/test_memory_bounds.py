"""Per-request state the server keeps across requests stays bounded (the soak's RssAnon limit, docs/reliability.md)."""

from __future__ import annotations

from llmctl_server.tokens import TOKEN_CACHE_ENTRIES, TokenText


class _WideTokenizer:
    """A tokenizer whose every id is a distinct token, like a 49k vocabulary seen through many logprobs."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return f"<t{ids[0]}>"

    def convert_ids_to_tokens(self, tid: int) -> str:
        return f"<t{tid}>"


def test_token_text_caches_stay_bounded_as_new_tokens_appear():
    tt = TokenText(_WideTokenizer())
    seen = 20_000  # more distinct tokens than the hot set: a long run with sampled tokens and top-k logprobs
    for tid in range(seen):
        assert tt.text(tid) == f"<t{tid}>"
        assert tt.bytes(tid) == list(f"<t{tid}>".encode())
    assert tt.text_of.cache_info().currsize <= TOKEN_CACHE_ENTRIES < seen // 4
    assert tt.bytes_of.cache_info().currsize <= TOKEN_CACHE_ENTRIES
    assert tt.text(7) == "<t7>"  # evicted entries are recomputed, not lost
