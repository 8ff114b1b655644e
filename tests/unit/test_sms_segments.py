"""SMS segment counting, checked against known carrier examples (3GPP TS 23.038)."""

from __future__ import annotations

import pytest

from engine.delivery.sms_segments import GSM7_BASIC, GSM7_EXTENSION, SmsSegments, segments


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", SmsSegments("GSM-7", 0, 0)),
        ("Hello", SmsSegments("GSM-7", 5, 1)),
        ("a" * 160, SmsSegments("GSM-7", 160, 1)),
        ("a" * 161, SmsSegments("GSM-7", 161, 2)),
        ("a" * 306, SmsSegments("GSM-7", 306, 2)),
        ("a" * 307, SmsSegments("GSM-7", 307, 3)),
        ("a" * 459, SmsSegments("GSM-7", 459, 3)),
        # Extension characters count two septets each.
        ("€", SmsSegments("GSM-7", 2, 1)),
        ("^{}\\[~]|€", SmsSegments("GSM-7", 18, 1)),
        ("a" * 158 + "€", SmsSegments("GSM-7", 160, 1)),
        ("a" * 159 + "€", SmsSegments("GSM-7", 161, 2)),
        ("a" * 80 + "[" * 40, SmsSegments("GSM-7", 160, 1)),
        # Accented letters of the basic set stay GSM-7.
        ("Café à Zürich, ¿Qué? ¡Ñoño! Øresund Ä £5 ¥ § @ _ Δ Ω", None),
        ("¿Sí?", SmsSegments("UCS-2", 4, 1)),  # í is not in the table (ì is)
        # One character outside GSM-7 makes the whole body UCS-2.
        ("Zażółć", SmsSegments("UCS-2", 6, 1)),
        ("ł" * 70, SmsSegments("UCS-2", 70, 1)),
        ("ł" * 71, SmsSegments("UCS-2", 71, 2)),
        ("ł" * 134, SmsSegments("UCS-2", 134, 2)),
        ("ł" * 135, SmsSegments("UCS-2", 135, 3)),
        ("Hello ç", SmsSegments("UCS-2", 7, 1)),  # lower-case ç is not in the GSM table
        ("Thanks 🙂", SmsSegments("UCS-2", 9, 1)),  # an emoji is two UTF-16 code units
        ("🙂" * 35, SmsSegments("UCS-2", 70, 1)),
        ("🙂" * 36, SmsSegments("UCS-2", 72, 2)),
        ("Привет", SmsSegments("UCS-2", 6, 1)),
    ],
)
def test_known_examples(body: str, expected: SmsSegments | None) -> None:
    result = segments(body)
    if expected is None:
        assert result.encoding == "GSM-7"
        assert result.characters == len(body)
        assert result.segments == 1
    else:
        assert result == expected


def test_an_escape_pair_is_never_split_across_segments() -> None:
    # 152 + 2 + 152 = 306 septets would fit two segments of 153, but the € cannot straddle
    # the boundary: segment 1 holds 152, segment 2 holds € + 151, segment 3 the last one.
    body = "a" * 152 + "€" + "a" * 152
    assert segments(body) == SmsSegments("GSM-7", 306, 3)
    assert segments("a" * 151 + "€" + "a" * 153) == SmsSegments("GSM-7", 306, 2)


def test_a_surrogate_pair_is_never_split_across_segments() -> None:
    body = "x" * 66 + "🙂" + "x" * 66  # 134 code units, the emoji at units 67-68
    assert segments(body) == SmsSegments("UCS-2", 134, 3)
    assert segments("x" * 65 + "🙂" + "x" * 67) == SmsSegments("UCS-2", 134, 2)


def test_the_tables_have_the_standard_sizes() -> None:
    # 128 code points in the basic table less ESC; 10 in the extension table (with \f).
    assert len(GSM7_BASIC) == 127
    assert frozenset("\f^{}\\[~]|€") == GSM7_EXTENSION
    assert not GSM7_BASIC & GSM7_EXTENSION


def test_newlines_and_carriage_returns_are_gsm() -> None:
    assert segments("line one\nline two\r\n") == SmsSegments("GSM-7", 19, 1)
