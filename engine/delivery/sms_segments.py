"""How many SMS segments a body costs, the way carriers (and Twilio's bill) count them.

A body that uses only the GSM-7 alphabet (3GPP TS 23.038 basic set plus its extension
table) is sent 7 bits per character: 160 septets fit one segment, and a longer body is
split into segments of 153 (the user-data header takes 7). Extension characters
(``^ { } \\ [ ~ ] | €`` and form feed) are sent as ESC + character and count 2 septets;
an escape pair is never split across two segments.

Any other character switches the whole body to UCS-2 (UTF-16): 70 code units fit one
segment, 67 per segment when split. Characters outside the Basic Multilingual Plane
(most emoji) are a surrogate pair, 2 code units, and a pair is never split either.

An empty body has 0 segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7_SINGLE, GSM7_MULTI = 160, 153
UCS2_SINGLE, UCS2_MULTI = 70, 67


@dataclass(frozen=True)
class SmsSegments:
    """The encoding a body needs, its length in that encoding's units, and its segments.

    ``characters`` counts septets for GSM-7 (extension characters count 2) and UTF-16 code
    units for UCS-2 (a character outside the BMP counts 2).
    """

    encoding: Literal["GSM-7", "UCS-2"]
    characters: int
    segments: int


def _units(body: str, gsm: bool) -> list[int]:
    """The size of each character in the encoding's units."""
    if gsm:
        return [2 if ch in GSM7_EXTENSION else 1 for ch in body]
    return [2 if ord(ch) > 0xFFFF else 1 for ch in body]


def _pack(units: list[int], per_segment: int) -> int:
    """Segments needed when no character's units may straddle a segment boundary."""
    segments, used = 1, 0
    for size in units:
        if used + size > per_segment:
            segments, used = segments + 1, 0
        used += size
    return segments


def segments(body: str) -> SmsSegments:
    """Count the segments of ``body``; see the module docstring for the rules."""
    gsm = all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in body)
    units = _units(body, gsm)
    total = sum(units)
    single, multi = (GSM7_SINGLE, GSM7_MULTI) if gsm else (UCS2_SINGLE, UCS2_MULTI)
    if total == 0:
        count = 0
    elif total <= single:
        count = 1
    else:
        count = _pack(units, multi)
    return SmsSegments("GSM-7" if gsm else "UCS-2", total, count)
