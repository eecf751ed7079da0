"""Addresses in MLflow's UI: a study's trials side by side, flat (not folded under the
study's run), sorted by the metric the study selects on, in chart view."""

from __future__ import annotations

from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from optimsweep.records.schema import TRIAL_ROLE, Tag

UI_PORT = 5000  # where `make ui` serves a SQLite store (its PORT)


def ui_base(tracking_uri: str, port: int = UI_PORT) -> str:
    """A tracking server is its own UI (shown without any credentials its URL holds); a
    SQLite store is seen through `make ui`, on loopback."""
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2],
                           parts.path.rstrip("/"), "", ""))
    return f"http://127.0.0.1:{port}"


def trials_view(base: str, experiment_id: str, metric: str, maximize: bool) -> str:
    """The study's trial runs, best first by `metric` (its latest value: for a complete
    trial, the value the study ranked it by). A sort by a metric is what lets MLflow list
    child runs flat; it charts the first ten."""
    query = {"searchFilter": f"tags.`{Tag.ROLE}` = '{TRIAL_ROLE}'",
             "orderByKey": f"metrics.`{metric}`", "orderByAsc": str(not maximize).lower(),
             "compareRunsMode": "CHART", "workflowType": "machine_learning"}
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"
