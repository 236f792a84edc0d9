"""The serving tests use the engine tests' tiny models and single-thread setting."""

from tests.engine.conftest import _single_thread, tiny_model  # noqa: F401  (fixtures)
