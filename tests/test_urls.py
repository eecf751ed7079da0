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
    # libpq's other forms: the password as a query parameter, the client key's passphrase
    ("postgresql://optuna@db.lan/studies?password=s3cret&sslmode=require",
     "postgresql://optuna@db.lan/studies?password=***&sslmode=require"),
    ("postgresql://optuna@db/x?sslmode=verify-full&sslpassword=k3y&PASSWORD=s3cret",
     "postgresql://optuna@db/x?sslmode=verify-full&sslpassword=***&PASSWORD=***"),
    ("host=db.lan user=optuna password='a s3cret' dbname=studies",
     "host=db.lan user=optuna password=*** dbname=studies"),
    ("postgresql://optuna@db/x?passfile=/home/me/.pgpass",
     "postgresql://optuna@db/x?passfile=/home/me/.pgpass"),
    # tokens of an http(s) tracking server: the userinfo alone, or a query parameter
    ("https://ghp_T0KEN@mlflow.example.com", "https://***@mlflow.example.com"),
    ("https://mlflow.example.com/?token=T0KEN&x=1", "https://mlflow.example.com/?token=***&x=1"),
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
    ("mlruns/optuna.journal", "mlruns/optuna.journal"),
])
def test_a_url_is_shown_without_its_password(url, shown):
    assert redact(url) == shown


def test_a_password_inside_an_error_message_is_replaced():
    assert "s3cret" not in redact_text('File "x.py", line 3, in open\n  storage = '
                                       '"postgresql://u@h/db?password=s3cret"')
    text = ('(psycopg.OperationalError) connection to "postgresql://optuna:s3cret@db:5432/x" '
            "failed")
    assert redact_text(text) == ('(psycopg.OperationalError) connection to '
                                 '"postgresql://optuna:***@db:5432/x" failed')


def test_the_ui_address_of_a_tracking_server_carries_no_credentials():
    from optimsweep.records.mlflow_ui import trials_view, ui_base

    assert ui_base("https://alice:s3cret@mlflow.example:8443/") == "https://mlflow.example:8443"
    assert ui_base("http://TOKEN@10.0.0.5:5001") == "http://10.0.0.5:5001"
    assert ui_base("sqlite:///mlruns/mlflow.db", 5005) == "http://127.0.0.1:5005"
    address = trials_view("http://h:1", "7", "val_loss", maximize=False)
    assert address.startswith("http://h:1/#/experiments/7/runs?")
    assert "orderByKey=metrics.%60val_loss%60&orderByAsc=true&compareRunsMode=CHART" in address
