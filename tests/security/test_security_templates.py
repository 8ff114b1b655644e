"""Templates cannot change shared data, hang or exhaust the process (issue 10, points 4-5).

Through the real loader (``rules check`` as a process, on real files) and the real
dispatcher: a template that crosses a bound fails ``rules check`` at its own
``path:line:col`` and fails its one message at send time, never the process.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from engine.data.ingest import CustomerIn, upsert_customer
from engine.data.models import Message, MessageStatus
from engine.delivery.sandbox import RenderLimits
from engine.delivery.templates import TemplateStore, sample_context
from engine.errors import RulesInvalid, TemplateError
from engine.playbooks.loader import load_rules
from engine.runners.ticks import dispatch_tick
from tests.support.cli import rules_check
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES
from tests.support.server import web_app

# Each of these hung or exhausted `rules check`, `tick` and `serve` before the bounds.
BOMBS = {
    "power": ("{{ (10 ** (10 ** 8)) > 1 }}", "a power would be a 400,000,000-bit number"),
    "repetition": ("{{ 'a' * 4000000000 }}", "a repeated text or list would be 4,000,000,000 long"),
    "list repetition": ("{{ [1] * 10 ** 9 }}", "a repeated text or list would be 1,000,000,000"),
    "nested ranges": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "more than 100,000 loop iterations and calls in one render",
    ),
    "one huge range": ("{% for i in range(10 ** 12) %}{% endfor %}", "a range would be"),
    "doubling with ~": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}",
        "a text joined with '~' would be 131,072 long",
    ),
    "squaring": (
        "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
        "{% endfor %}{{ ns.n }}",
        "a product would be a",
    ),
    "exponential macro": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
        "more than 100,000 loop iterations and calls",
    ),
    "recursive macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "nested too deeply"),
    "batch filter": ("{{ [1]|batch(10 ** 9, 'x')|list }}", "the count of the batch filter"),
    "slice filter": ("{{ [1]|slice(10 ** 9)|list }}", "the count of the slice filter"),
    "padding filter": ("{{ 'a'|center(10 ** 9) }}", "the width of the center filter"),
    "padding method": ("{{ 'a'.rjust(10 ** 9) }}", "str.rjust() would be 1,000,000,000 long"),
    "format width": ("{{ '{:>1000000000}'.format('a') }}", "a formatted field would be"),
    "printf width": ("{{ '%1000000000s' % 'a' }}", "a formatted field would be"),
    "replace growth": (
        "{{ ('a' * 90000)|replace('a', 'aaaaaaaaaa') }}",
        "the result of the replace filter would be 900,000 long",
    ),
    "output size": (
        "{% for i in range(20000) %}{{ 'x' * 99 }}{% endfor %}",
        "the output is longer than 1,000,000 characters",
    ),
}


def store_with(tmp_path: Path, sms_body: str, limits: RenderLimits | None = None) -> TemplateStore:
    templates = tmp_path / "templates"
    if not templates.exists():
        shutil.copytree(FIXTURE_TEMPLATES, templates)
    (templates / "sms" / "last_chance.txt").write_text(
        f"Hi {{{{ customer.first_name }}}}\n{sms_body}\n"
    )
    return TemplateStore(templates, limits)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_template_that_does_too_much_work_is_a_template_error_at_its_line(
    name: str, tmp_path: Path
) -> None:
    body, expected = BOMBS[name]
    store = store_with(tmp_path, body)
    with pytest.raises(TemplateError) as caught:
        store.render_sms("last_chance", sample_context({}))
    assert caught.value.template == "sms/last_chance.txt"
    assert caught.value.line == 2, str(caught.value)
    assert expected in caught.value.message


def test_a_render_past_its_deadline_stops(tmp_path: Path) -> None:
    # A deadline of zero: the first piece of output (line 1) is already late (no timing).
    store = store_with(
        tmp_path, "{% for i in range(3) %}{{ i }}{% endfor %}", RenderLimits(deadline_s=0)
    )
    with pytest.raises(
        TemplateError,
        match=r"sms/last_chance.txt:1: too much work: the render took longer than 0 s",
    ):
        store.render_sms("last_chance", sample_context({}))


def test_ordinary_templates_still_render(tmp_path: Path) -> None:
    body = "{{ 2 ** 10 }} {{ 'ab' * 3 }} {% for i in range(3) %}{{ i }}{% endfor %} {{ '%5s|'|format('x') }} {{ 'x'|center(5) }}|"
    rendered = store_with(tmp_path, body).render_sms("last_chance", sample_context({}))
    assert rendered.body == "Hi Sam\n1024 ababab 012     x|   x  |"


def test_a_template_cannot_change_the_brand_the_next_customer_sees(tmp_path: Path) -> None:
    store = store_with(tmp_path, '{{ brand.update({"address": customer.email}) }}')
    context = sample_context({})
    brand = {"name": "Lifecycle Shop", "address": "1 Example Street"}
    context["brand"] = brand
    with pytest.raises(
        TemplateError,
        match="not allowed in a template: access to attribute 'update' of 'dict' object is unsafe",
    ):
        store.render_sms("last_chance", context)
    assert brand == {"name": "Lifecycle Shop", "address": "1 Example Street"}
    # Even what the immutable sandbox allows (a namespace) works on the render's own copy.
    (tmp_path / "templates" / "sms" / "last_chance.txt").write_text(
        "{% set ns = namespace() %}{% set ns.x = 1 %}{{ brand.address }}\n"
    )
    fresh = TemplateStore(tmp_path / "templates")
    assert fresh.render_sms("last_chance", context).body == "1 Example Street"


def test_rules_check_refuses_the_brand_update_attack_as_a_real_process(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(FIXTURE_TEMPLATES, templates)
    footer = templates / "layouts" / "email.txt"
    footer.write_text(footer.read_text() + '{{ brand.update({"address": customer.email}) }}\n')
    line = len(footer.read_text().splitlines())
    result = rules_check(FIXTURE_RULES, templates)
    assert result.returncode == 1, result.stdout
    assert (
        f"{footer}:{line}:1: template does not render: not allowed in a template: access to attribute 'update'"
        in result.stdout
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["power", "repetition", "nested ranges"])
def test_rules_check_names_the_template_line_of_a_bomb(name: str, tmp_path: Path) -> None:
    body, expected = BOMBS[name]
    store_with(tmp_path, body)
    with pytest.raises(RulesInvalid) as caught:
        load_rules(FIXTURE_RULES, tmp_path / "templates")
    shown = [str(p) for p in caught.value.problems]
    path = tmp_path / "templates" / "sms" / "last_chance.txt"
    assert any(
        line.startswith(f"{path}:2:1: template does not render: too much work: {expected}")
        and "(used by " in line
        for line in shown
    ), shown


def test_a_bomb_fails_its_message_at_send_time_and_the_others_are_sent(
    db_url: str, tmp_path: Path, now
) -> None:  # type: ignore[no-untyped-def]
    app = web_app(db_url, tmp_path, now)
    store = store_with(tmp_path, BOMBS["nested ranges"][0])
    app.templates = store
    with Session(app.db) as session:
        for cid in ("ann", "bob"):
            upsert_customer(
                session,
                CustomerIn(
                    id=cid,
                    email=f"{cid}@example.com",
                    phone="+447700900123",
                    first_name=cid,
                    email_opt_in=True,
                    sms_opt_in=True,
                    signed_up_at=now - timedelta(days=3),
                ),
                now,
            )
        ids = {}
        for cid, channel, template in (("ann", "sms", "last_chance"), ("bob", "email", "welcome")):
            ids[cid] = str(uuid.uuid4())
            session.add(
                Message(
                    id=ids[cid],
                    dedupe_key=f"test:{ids[cid]}",
                    customer_id=cid,
                    playbook="welcome_series",
                    step_id=template,
                    kind="transactional",
                    channel=channel,
                    template=template,
                    to_address="",
                    context={"event": {}},
                    status=MessageStatus.QUEUED,
                    due_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        session.commit()
    report = dispatch_tick(app, now)
    assert report.failed == 1 and report.total_sent == 1
    with Session(app.db) as session:
        bad, good = session.get(Message, ids["ann"]), session.get(Message, ids["bob"])
        assert good is not None and good.status == MessageStatus.SENT
        assert bad is not None and bad.status == MessageStatus.FAILED
        assert bad.last_error == (
            "render failed: template sms/last_chance.txt:2: too much work: "
            "more than 100,000 loop iterations and calls in one render"
        )
    app.db.dispose()
