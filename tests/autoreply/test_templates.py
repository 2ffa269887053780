"""Templates and the promised answer time: business hours across a weekend, per-team wording, config errors."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gatewayd import config as config_module
from gatewayd.business_hours import BusinessHours, HoursError, describe, expected_by, is_open, parse_hours
from gatewayd.errors import ConfigError
from gatewayd.receipt import ReceiptContext, build, check_headers
from gatewayd.templates import load_templates
from tests.autoreply.conftest import TEMPLATES

BERLIN = ZoneInfo("Europe/Berlin")
OFFICE = BusinessHours("Europe/Berlin", parse_hours({"mon-fri": "09:00-17:00"}))
HOUR = 3600.0


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


class TestExpectedTime:
    def test_friday_afternoon_rolls_over_the_weekend(self) -> None:
        friday = berlin(2025, 1, 10, 15, 0)
        due = expected_by(friday, 4 * HOUR, OFFICE)
        assert due == berlin(2025, 1, 13, 11, 0)
        assert describe(due, friday) == "Monday 11:00 CET"

    def test_saturday_counts_from_monday_morning(self) -> None:
        saturday = berlin(2025, 1, 11, 12, 0)
        assert expected_by(saturday, 24 * HOUR, OFFICE) == berlin(2025, 1, 15, 17, 0)

    def test_a_full_working_day_target(self) -> None:
        assert expected_by(berlin(2025, 1, 14, 9, 0), 8 * HOUR, OFFICE) == berlin(2025, 1, 14, 17, 0)

    def test_holidays_are_skipped(self) -> None:
        hours = BusinessHours("Europe/Berlin", parse_hours({"mon-fri": "09:00-17:00"}),
                              frozenset({datetime(2025, 1, 13).date()}))
        assert expected_by(berlin(2025, 1, 10, 16, 0), 2 * HOUR, hours) == berlin(2025, 1, 14, 10, 0)

    def test_summer_time_shows_cest(self) -> None:
        due = expected_by(berlin(2025, 7, 4, 16, 0), 2 * HOUR, OFFICE)
        assert describe(due, berlin(2025, 7, 4, 16, 0)) == "Monday 10:00 CEST"

    def test_without_business_hours_it_is_elapsed_time_in_utc(self) -> None:
        start = datetime(2025, 1, 10, 15, 0, tzinfo=timezone.utc)
        assert describe(expected_by(start, 24 * HOUR, None), start) == "Saturday 15:00 UTC"

    def test_far_away_answers_carry_the_date(self) -> None:
        start = berlin(2025, 1, 10, 15, 0)
        assert describe(expected_by(start, 80 * HOUR, OFFICE), start) == "Friday 24 January 15:00 CET"

    def test_a_night_desk_counts_across_midnight(self) -> None:
        night = BusinessHours("Europe/Berlin", parse_hours({"mon-fri": "22:00-06:00"}))
        assert expected_by(berlin(2025, 1, 13, 23, 0), 2 * HOUR, night) == berlin(2025, 1, 14, 1, 0)
        assert expected_by(berlin(2025, 1, 14, 12, 0), 1 * HOUR, night) == berlin(2025, 1, 14, 23, 0)
        friday_night = expected_by(berlin(2025, 1, 17, 23, 0), 8 * HOUR, night)
        assert friday_night == berlin(2025, 1, 20, 23, 0), "Friday's shift ends Saturday 06:00; Monday's is next"

    def test_a_holiday_the_night_shift_runs_into_does_not_stop_it(self) -> None:
        night = BusinessHours("Europe/Berlin", parse_hours({"mon": "22:00-06:00"}),
                              frozenset({datetime(2025, 1, 14).date()}))
        assert expected_by(berlin(2025, 1, 13, 23, 0), 2 * HOUR, night) == berlin(2025, 1, 14, 1, 0)

    def test_business_time_is_real_time_across_daylight_saving_changes(self) -> None:
        night = BusinessHours("Europe/Berlin", parse_hours({"mon-sun": "22:00-06:00"}))
        spring = expected_by(berlin(2025, 3, 29, 23, 0), 4 * HOUR, night)
        assert spring.astimezone(timezone.utc) == datetime(2025, 3, 30, 2, 0, tzinfo=timezone.utc)
        autumn = expected_by(berlin(2025, 10, 25, 23, 0), 4 * HOUR, night)
        assert autumn.astimezone(timezone.utc) == datetime(2025, 10, 26, 1, 0, tzinfo=timezone.utc)
        always = BusinessHours("Europe/Berlin", parse_hours({"mon-sun": "00:00-24:00"}))
        first_half_past_two = datetime(2025, 10, 26, 0, 30, tzinfo=timezone.utc)  # 02:30 CEST
        due = expected_by(first_half_past_two, 0.5 * HOUR, always)
        assert due.astimezone(timezone.utc) == datetime(2025, 10, 26, 1, 0, tzinfo=timezone.utc)

    def test_a_night_shift_and_the_next_mornings_overlap_count_once(self) -> None:
        hours = BusinessHours("Europe/Berlin", parse_hours({"mon": "22:00-06:00", "tue": "00:00-08:00"}))
        assert expected_by(berlin(2025, 1, 13, 22, 0), 9 * HOUR, hours) == berlin(2025, 1, 14, 7, 0)

    def test_overlapping_spans_count_once(self) -> None:
        hours = BusinessHours("Europe/Berlin", parse_hours({"mon-fri": "09:00-12:00, 11:00-13:00"}))
        assert hours.week[0] == ((540, 780),)
        assert expected_by(berlin(2025, 1, 13, 9, 0), 5 * HOUR, hours) == berlin(2025, 1, 14, 10, 0)


class TestHoursGrammar:
    """One grammar for business_hours.hours and the schedule plugin's hours."""

    def test_days_ranges_that_wrap_lists_and_off(self) -> None:
        week = parse_hours({"fri-mon": "10:00-14:00", "tue,thu": ["08:00-09:00", "17:00-18:00"], "sun": "off"})
        assert week == (((600, 840),), ((480, 540), (1020, 1080)), (), ((480, 540), (1020, 1080)),
                        ((600, 840),), ((600, 840),), ())

    def test_off_closes_days_opened_before_it_with_their_night_shift(self) -> None:
        week = parse_hours({"mon-sun": "22:00-06:00", "sat,sun": "off"})
        assert week[4] == ((1320, 1800),), "Friday's shift runs to Saturday 06:00 and is Friday's"
        assert week[5] == () and week[6] == ()
        assert is_open(week, berlin(2025, 1, 18, 5, 0)) and not is_open(week, berlin(2025, 1, 19, 5, 0))

    def test_a_range_past_midnight_ends_the_next_morning(self) -> None:
        week = parse_hours({"sun": "22:00-06:00"})
        assert week[6] == ((1320, 1800),) and week[0] == ()
        assert is_open(week, berlin(2025, 1, 13, 5, 59)) and not is_open(week, berlin(2025, 1, 13, 6, 0))

    def test_a_holiday_closes_the_shifts_that_start_on_it(self) -> None:
        week = parse_hours({"mon": "22:00-06:00"})
        tuesday = frozenset({datetime(2025, 1, 14).date()})
        monday = frozenset({datetime(2025, 1, 13).date()})
        assert is_open(week, berlin(2025, 1, 14, 1, 0), tuesday), "Monday's shift runs into the Tuesday holiday"
        assert not is_open(week, berlin(2025, 1, 14, 1, 0), monday), "a shift that never started"

    def test_off_in_any_case_and_yaml_false_close_the_day(self) -> None:
        assert parse_hours({"mon-fri": "09:00-17:00", "fri": "Off", "thu": False})[3:5] == ((), ())

    def test_whole_days(self) -> None:
        week = parse_hours({"mon-sun": "00:00-24:00"})
        assert all(day == ((0, 1440),) for day in week)
        assert is_open(week, berlin(2025, 1, 15, 23, 59))

    @pytest.mark.parametrize("hours, key, message", [
        ({"funday": "09:00-17:00"}, "funday", "not a day"),
        ({"mon-": "09:00-17:00"}, "mon-", "not a day"),
        ({"mon": ""}, "mon", "has no time range"),
        ({"mon": []}, "mon", "has no time range"),
        ({"mon": 0}, "mon", "quote it in YAML"),
        ({"mon": "9-5"}, "mon", "not a time range"),
        ({"mon": "09:00-09:00"}, "mon", "not a time range of a day"),
        ({"mon": "08:00-24:30"}, "mon", "not a time range of a day"),
        ({"mon-fri": 900}, "mon-fri", "quote it in YAML"),
    ])
    def test_bad_hours_name_the_day_entry(self, hours, key, message) -> None:
        with pytest.raises(HoursError, match=message) as caught:
            parse_hours(hours)
        assert caught.value.key == key


def context(**changes: object) -> ReceiptContext:
    values = dict(ticket="SUP-1042", support_address="support@example.test", customer_address="carol@customer.test",
                  customer_name="Carol", subject="Printer on fire", team="support", expected="Monday 11:00 CET",
                  message_id="<SUP-1042.abc.def@gw.example.test>", pseudo_reference="<SUP-1042@gw.example.test>",
                  customer_message_id="<m1@customer.test>", date=berlin(2025, 1, 10, 15, 0))
    values.update(changes)
    return ReceiptContext(**values)  # type: ignore[arg-type]


class TestRendering:
    def test_the_shipped_receipt_states_ticket_team_and_the_weekend_answer_time(self) -> None:
        templates = load_templates(TEMPLATES, ["receipt"], ["support", "security"])
        due = expected_by(berlin(2025, 1, 10, 15, 0), 4 * HOUR, OFFICE)
        data = build(templates.get("receipt", "support"),
                     context(expected=describe(due, berlin(2025, 1, 10, 15, 0))))
        text = data.decode()
        assert "Subject: [SUP-1042] Re: Printer on fire" in text
        assert "by Monday 11:00 CET" in text
        assert "support team" in text and "Hello Carol," in text

    def test_html_escapes_customer_text(self) -> None:
        templates = load_templates(TEMPLATES, ["receipt"], [])
        data = build(templates.get("receipt", None), context(customer_name="<script>x</script>"))
        from email import message_from_bytes, policy

        html = message_from_bytes(data, policy=policy.SMTP).get_body(("html",)).get_content()
        assert "<script>" not in html and "Hello &lt;script&gt;x&lt;/script&gt;," in html

    def test_no_name_greets_politely(self) -> None:
        templates = load_templates(TEMPLATES, ["receipt"], [])
        assert b"Hello there," in build(templates.get("receipt", None), context(customer_name=""))

    def test_a_hostile_message_id_is_not_copied(self) -> None:
        templates = load_templates(TEMPLATES, ["receipt"], [])
        data = build(templates.get("receipt", None), context(customer_message_id="<a\x0bb@x>"))
        assert b"In-Reply-To: <SUP-1042@gw.example.test>" in data

    def test_the_header_check_refuses_extra_fields(self) -> None:
        with pytest.raises(ValueError):
            check_headers(b"From: a@b.test\r\nBcc: v@evil.test\r\n\r\nbody\r\n")
        with pytest.raises(ValueError):
            check_headers(b"From: a@b.test\r\nFrom: c@d.test\r\n\r\nbody\r\n")


BASE = ("hostname: gw.example.test\nsupport: {addresses: [s@example.test], reply_secret: 12345678}\n"
        "relay: {address: '127.0.0.1:25'}\nteams: [{name: t, supervisor: l@example.test}]\n"
        "agents: [{name: a, address: a@example.test, teams: [t]}]\n"
        "listeners: [{protocol: smtp, address: '127.0.0.1:2525'}]\n")


def issues(text: str, tmp_path: Path) -> list[tuple[str, int | None, str]]:
    source = tmp_path / "gatewayd.yaml"
    with pytest.raises(ConfigError) as caught:
        config_module.loads(BASE + text, str(source), source)
    return [(i.path, i.line, i.message) for i in caught.value.issues]


class TestConfig:
    def test_unknown_placeholder_is_a_located_error(self, tmp_path) -> None:
        templates = tmp_path / "templates"
        templates.mkdir()
        for name in ("receipt.subject", "receipt.txt", "receipt.html"):
            (templates / name).write_text((TEMPLATES / name).read_text())
        (templates / "receipt.txt").write_text("Hello $customer_nmae\n")
        [(path, line, message)] = issues("autoreply:\n  templates: templates\n", tmp_path)
        assert path == "autoreply.templates" and line == 8 and "customer_nmae" in message

    def test_missing_template_directory(self, tmp_path) -> None:
        [(path, _, message)] = issues("autoreply: {enabled: true}\n", tmp_path)
        assert path == "autoreply.templates" and "not a directory" in message

    def test_bad_rate_policy_and_hours(self, tmp_path) -> None:
        found = issues(f"autoreply:\n  templates: '{TEMPLATES}'\n  rate: {{per_sender: 0}}\n"
                       "  suppress_senders: ['(']\nauthentication: {unauthenticated: bounce}\n"
                       "business_hours: {timezone: Mars/Olympus, hours: {mon-fri: '9-5'}}\n", tmp_path)
        assert [p for p, _, _ in found] == ["autoreply.rate.per_sender", "autoreply.suppress_senders",
                                            "authentication.unauthenticated", "business_hours.timezone",
                                            "business_hours.hours.mon-fri"]

    def test_business_hours_that_are_never_open_and_bad_days_are_refused_by_key(self, tmp_path) -> None:
        found = issues("business_hours: {timezone: Europe/Berlin, hours: {mon-sun: 'off'}}\n"
                       "sla:\n  teams:\n    t:\n      business_hours: {timezone: UTC, hours: {funday: '09:00-17:00'}}\n",
                       tmp_path)
        assert [(p, m) for p, _, m in found] == [
            ("business_hours.hours", "needs at least one opening span (a week that is never open has no answer time)"),
            ("sla.teams.t.business_hours.hours.funday",
             "is not a day, day range or list (mon..sun, e.g. mon-fri or sat,sun)")]

    def test_the_shipped_example_enables_receipts_with_its_templates(self) -> None:
        from tests.support.gateway import REPO

        config = config_module.load(REPO / "etc" / "gatewayd.yaml")
        assert config.autoreply.enabled and config.autoreply.templates is not None
        assert config.business_hours is not None and config.authentication.unauthenticated == "accept"
