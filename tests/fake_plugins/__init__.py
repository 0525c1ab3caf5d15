"""Fake plugins for tests/test_plugin_manager.py, loaded through hand-made ``EntryPoint`` objects."""
