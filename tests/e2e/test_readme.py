"""The README keeps its promises: its settings table is the Settings class, and each of
its HTTP API examples, sent to the real app, gets the answer it shows."""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from docs import readme
from engine.bootstrap import App
from engine.settings import Settings
from engine.web.app import create_app
from tests.support.server import web_app

API_KEY = "readme-example-key-0123456789"
AT = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def test_the_settings_table_and_the_api_examples_are_in_step_with_their_sources() -> None:
    text = readme.README.read_text(encoding="utf-8")
    assert readme.updated(text) == text, "README.md is out of step: run python -m docs.readme"


def test_every_setting_says_what_it_is_for() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not field.description]
    assert missing == [], f"give these settings a description (Field(description=...)): {missing}"


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[App]:
    application = web_app(
        db_url,
        tmp_path,
        AT,
        api_key=API_KEY,
        segment_event_types={"Order Completed": "order_placed"},
        default_phone_region="GB",
    )
    yield application
    application.db.dispose()


def headers(auth: str) -> dict[str, str]:
    if auth == "bearer":
        return {"Authorization": f"Bearer {API_KEY}"}
    if auth == "basic":
        return {"Authorization": "Basic " + b64encode(f"{API_KEY}:".encode()).decode()}
    return {}


def shown_in(documented: Any, actual: Any, abridged: bool) -> bool:
    """``documented`` is ``actual``, or, abridged, the part of it the README shows (objects
    may leave keys out; everything shown must be as shown)."""
    if abridged and isinstance(documented, dict) and isinstance(actual, dict):
        return all(k in actual and shown_in(v, actual[k], abridged) for k, v in documented.items())
    return bool(documented == actual)


def test_every_api_example_gets_the_answer_the_readme_shows(app: App) -> None:
    with TestClient(create_app(app)) as client:
        for example in readme.examples():
            response = client.request(
                example["method"],
                example["path"],
                json=example["body"],
                headers=headers(example["auth"]),
            )
            title = example["title"]
            assert response.status_code == example["status"], (title, response.text)
            assert shown_in(example["answer"], response.json(), bool(example.get("abridged"))), (
                title,
                response.json(),
            )
