"""No password from a storage or tracking URL is ever shown or stored."""

from __future__ import annotations

import pytest

from optimsweep.util.urls import redact, redact_text


@pytest.mark.parametrize("url, shown", [
    ("postgresql://optuna:s3cret@db.lan:5432/studies",
     "postgresql://optuna:***@db.lan:5432/studies"),
    ("postgresql+psycopg://u:p%40ss@10.0.0.5/db?sslmode=require",
     "postgresql+psycopg://u:***@10.0.0.5/db?sslmode=require"),
    ("http://admin:hunter2@mlflow.lan:5000", "http://admin:***@mlflow.lan:5000"),
    ("postgresql://optuna@db.lan/studies", "postgresql://optuna@db.lan/studies"),
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
    ("mlruns/optuna.journal", "mlruns/optuna.journal"),
])
def test_a_url_is_shown_without_its_password(url, shown):
    assert redact(url) == shown


def test_a_password_inside_an_error_message_is_replaced():
    text = ('(psycopg.OperationalError) connection to "postgresql://optuna:s3cret@db:5432/x" '
            "failed")
    assert redact_text(text) == ('(psycopg.OperationalError) connection to '
                                 '"postgresql://optuna:***@db:5432/x" failed')
