"""What went wrong, said once: the chain of causes an error line is drawn from."""

from __future__ import annotations

from optimsweep.errors import chain


def test_a_chain_of_causes_that_loops_back_is_walked_once():
    """An exception raised while handling one that is its own context (SQLAlchemy and
    MLflow make such chains when a store goes away): reading it must end."""
    first, second = OSError("connection refused"), RuntimeError("tracking store")
    second.__cause__, first.__context__ = first, second
    assert list(chain(second)) == [second, first]
    assert list(chain(None)) == []
