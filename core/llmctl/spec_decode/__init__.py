"""Speculative decoding: proposers guess the next tokens, the target model checks every guess in one forward
pass over the paged cache, and the rejection sampler keeps the target's distribution exactly."""
