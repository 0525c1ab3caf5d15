"""Fake llmctl backends used only by the test suite (never installed as entry points)."""
