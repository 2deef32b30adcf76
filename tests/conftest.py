"""Shared fixtures live in tests/fixtures/*; registered here as plugins."""

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.redis", "tests.fixtures.server"]
