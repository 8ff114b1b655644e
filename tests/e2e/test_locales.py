"""Locale variants of templates and money and dates in the customer's locale, through the
real CLI (`rules check` as a process, `preview`) and a real tick (dispatch renders)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from channels.memory import MemoryChannel
from engine.bootstrap import bootstrap
from engine.cli import app as cli_app
from engine.data.models import Customer, Message, MessageStatus
from engine.delivery.templates import TemplateStore, babel_locale, locale_chain
from engine.runners.ticks import dispatch_tick
from engine.settings import Settings
from tests.support.cli import rules_check
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES, ROOT

NOW = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(FIXTURE_TEMPLATES, target)
    return target


def test_the_locale_chain_falls_back_from_region_to_language_to_the_default() -> None:
    assert locale_chain("fr-CA") == ["fr-CA", "fr"]
    assert locale_chain("fr") == ["fr"]
    assert locale_chain(None) == []
    store = TemplateStore(FIXTURE_TEMPLATES)
    assert store.locales("email", "welcome") == ["fr"]
    assert [
        store.variant_for("email", "welcome", tag) for tag in ("fr-CA", "fr", "de", "en-GB")
    ] == [
        "fr",
        "fr",
        None,
        None,
    ]
    # Babel's locale follows the same chain, ending at en-GB for one it does not know.
    assert [str(babel_locale(tag)) for tag in ("fr-CA", "xx-YY", None)] == [
        "fr_CA",
        "en_GB",
        "en_GB",
    ]


def test_money_and_dates_are_written_the_way_the_customers_locale_writes_them(
    templates: Path,
) -> None:
    (templates / "sms" / "receipt.txt").write_text(
        "{{ facts.total_spend_cents | money }} on {{ facts.birthday | date('long') }}, "
        "{{ facts.total_spend_cents | money('EUR') }}, {{ '2026-12-24' | date }}\n"
    )
    store = TemplateStore(templates)
    context = {"facts": {"total_spend_cents": 123_450, "birthday": 20_514}}  # 2026-03-02
    bodies = {
        tag: store.render("sms", "receipt", context, locale=tag, currency="USD").body  # type: ignore[union-attr]
        for tag in ("en-GB", "en-US", "fr-CA", "de")
    }
    assert bodies == {
        "en-GB": "US$1,234.50 on 2 March 2026, €1,234.50, 24 Dec 2026",
        "en-US": "$1,234.50 on March 2, 2026, €1,234.50, Dec 24, 2026",
        "fr-CA": "1\u00a0234,50\u00a0$\u00a0US on 2 mars 2026, 1\u00a0234,50\u00a0€, 24 déc. 2026",
        "de": "1.234,50\u00a0$ on 2. März 2026, 1.234,50\u00a0€, 24.12.2026",
    }
    gbp = store.render("sms", "receipt", context, locale="en-GB", currency="GBP")
    assert gbp.body.startswith("£1,234.50 on")  # type: ignore[union-attr]


def test_rules_check_reports_a_variant_whose_variables_differ_at_its_path(
    templates: Path,
) -> None:
    french = templates / "email" / "welcome.fr.html"
    french.write_text(
        french.read_text().replace(
            '{{ customer.first_name or "cher client" }}', "{{ customer.email }}"
        )
    )
    layout = templates / "layouts" / "email.fr.txt"
    layout.write_text(layout.read_text().replace("{{ unsubscribe_url }}", "(lien)"))
    (templates / "email" / "welcome.fr.txt").unlink()
    (templates / "email" / "welcome.FR.subject").write_text("Hello\n")
    result = rules_check(FIXTURE_RULES, templates)
    assert result.returncode == 1
    email = templates / "email"
    assert result.stdout.splitlines() == [
        f"{email}/welcome.FR.subject:1:1: 'FR' is not a locale: a variant is written like "
        "welcome.fr.subject or welcome.fr-CA.subject (language, then country)",
        f"{email}/welcome.fr.html:1:1: the fr variant does not use customer.first_name, which "
        "its default email/welcome.html does",
        f"{email}/welcome.fr.html:3:1: the fr variant uses customer.email, which its default "
        "email/welcome.html does not",
        f"{email}/welcome.fr.subject:1:1: the fr variant of email/welcome lacks "
        "email/welcome.fr.txt (a variant has every part: subject, html, txt)",
        f"{templates}/layouts/email.fr.txt:1:1: the fr variant does not use unsubscribe_url, "
        "which its default layouts/email.txt does",
    ]


def test_rules_check_renders_every_variant_and_says_which_there_are(templates: Path) -> None:
    ok = rules_check(FIXTURE_RULES, FIXTURE_TEMPLATES)
    assert ok.returncode == 0, ok.stdout
    assert "locale variants: email/welcome (fr)" in ok.stdout.splitlines()
    (templates / "email" / "welcome.fr.subject").write_text("Bienvenue {{ customer.prenom }}\n")
    broken = rules_check(FIXTURE_RULES, templates)
    lines = broken.stdout.splitlines()
    assert any(
        line.startswith(f"{templates}/email/welcome.fr.subject:1:1: template does not render: ")
        and "prenom" in line
        for line in lines
    ), lines


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_dispatch_sends_each_customer_the_variant_of_their_locale(
    db_url: str, tmp_path: Path
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=db_url,
        rules_dir=FIXTURE_RULES,
        templates_dir=FIXTURE_TEMPLATES,
        outbox_dir=tmp_path / "outbox",
        secret_key="locales-secret-key-for-tests",
    )
    email = MemoryChannel()
    app = bootstrap(settings, channels={"email": email, "sms": MemoryChannel()}, migrate=False)
    people = {"amelie": "fr-CA", "bruno": "fr", "dora": "de", "eve": "en-GB"}
    with Session(app.db) as session:
        for who, locale in people.items():
            session.add(
                Customer(
                    id=who,
                    email=f"{who}@example.com",
                    first_name=who.title(),
                    locale=locale,
                    email_opt_in=True,
                    signed_up_at=NOW - timedelta(days=1),
                    changed_at=NOW,
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
            session.add(
                Message(
                    id=f"m-{who}",
                    dedupe_key=f"k-{who}",
                    customer_id=who,
                    playbook="welcome_series",
                    step_id="welcome",
                    kind="marketing",
                    channel="email",
                    template="welcome",
                    to_address="",
                    status=MessageStatus.QUEUED,
                    due_at=NOW,
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
        session.commit()
    dispatch_tick(app, NOW)
    subjects = {m.to.split("@")[0]: m.subject for m in email.emails()}
    assert subjects == {
        "amelie": "Bienvenue chez Lifecycle Shop, Amelie !",
        "bruno": "Bienvenue chez Lifecycle Shop, Bruno !",
        "dora": "Welcome to Lifecycle Shop, Dora!",
        "eve": "Welcome to Lifecycle Shop, Eve!",
    }
    french = next(m for m in email.emails() if m.to == "amelie@example.com")
    assert "Se désabonner en un clic : http://127.0.0.1:8000/u/" in french.text  # French layout
    app.db.dispose()


def test_preview_shows_the_variant_and_money_in_the_customers_locale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    for name, value in {
        "LIFECYCLE_DATABASE_URL": f"sqlite:///{tmp_path / 'preview.db'}",
        "LIFECYCLE_RULES_DIR": str(FIXTURE_RULES),
        "LIFECYCLE_TEMPLATES_DIR": str(FIXTURE_TEMPLATES),
        "COLUMNS": "200",
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    customers = tmp_path / "customers.jsonl"
    customers.write_text(
        '{"id": "amelie", "email": "a@example.com", "first_name": "Amélie", "locale": "fr-CA", '
        '"email_opt_in": true}\n'
    )
    assert runner.invoke(cli_app, ["import", "customers", str(customers)]).exit_code == 0
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"id": "o1", "customer_id": "amelie", "type": "order_placed", '
        '"occurred_at": "2026-03-01T10:00:00Z", "properties": {"amount_cents": 123450}}\n'
    )
    assert runner.invoke(cli_app, ["import", "events", str(events)]).exit_code == 0
    welcome = runner.invoke(cli_app, ["preview", "welcome", "--customer", "amelie"])
    assert welcome.exit_code == 0, welcome.output
    assert "Template: email/welcome, the fr variant (customer locale fr-CA)" in welcome.output
    assert "Subject: Bienvenue chez Lifecycle Shop, Amélie !" in welcome.output
    reward = runner.invoke(cli_app, ["preview", "loyalty_reward", "--customer", "amelie"])
    assert "Template: email/loyalty_reward, the default (customer locale fr-CA)" in reward.output
    assert "1 orders and 1\u00a0234,50\u00a0$\u00a0US spent" in reward.output


def test_the_shops_currency_is_an_iso_4217_code(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(FIXTURE_RULES, rules)
    policies = rules / "policies.yaml"
    policies.write_text(policies.read_text().replace("currency: USD", "currency: usd"))
    result = rules_check(rules, FIXTURE_TEMPLATES)
    line = next(n for n, text in enumerate(policies.read_text().splitlines(), 1) if "usd" in text)
    assert result.stdout.splitlines() == [
        f"{policies}:{line}:11: unknown currency 'usd' (did you mean 'USD'?): write an ISO 4217 "
        "code like USD, GBP or EUR"
    ]
