"""Email addresses and phone numbers, checked and normalised by the field's libraries.

``email-validator`` checks an address's syntax (never its DNS: no network in ingestion or
tests) and gives its normalised form, which we lower-case whole, as every lookup of an
address (suppressions, provider webhooks) does. ``phonenumbers`` (Google's libphonenumber)
parses a number written internationally (``+44 7700 900123``) or, given a default region,
nationally (``07700 900123`` in GB), refuses one that no numbering plan makes possible,
and writes it as E.164 (``+447700900123``), the only form stored.

A number is refused when it is *impossible* (wrong length for its country, an unknown
country code), not when it is merely unassigned today: reserved ranges such as Ofcom's
drama numbers are possible, and valid for every purpose but a real handset.
"""

from __future__ import annotations

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers import NumberParseException, PhoneNumberFormat, ValidationResult

_IMPOSSIBLE = {
    ValidationResult.INVALID_COUNTRY_CODE: "its country code is not one in use",
    ValidationResult.TOO_SHORT: "it is too short for its country",
    ValidationResult.TOO_LONG: "it is too long for its country",
    ValidationResult.INVALID_LENGTH: "it has a length no number of its country has",
}


def normalise_email(text: str) -> str:
    """The address in its normalised, lower-case form; ValueError saying what is wrong."""
    try:
        checked = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{text!r} is not an email address: {exc}") from None
    return checked.normalized.lower()


def normalise_phone(text: str, region: str | None = None) -> str:
    """The number as E.164; ValueError saying what is wrong.

    ``region`` (an ISO 3166 code such as ``GB``, from LIFECYCLE_DEFAULT_PHONE_REGION) is
    the country of a number written without ``+``; without one, only international numbers
    are understood.
    """
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        national = not text.strip().startswith("+")
        if exc.error_type == NumberParseException.INVALID_COUNTRY_CODE and national:
            raise ValueError(
                f"{text!r} is not an international number (like +447700900123); write it "
                "with its country code, or set LIFECYCLE_DEFAULT_PHONE_REGION (e.g. GB) "
                "to read national numbers"
            ) from None
        raise ValueError(f"{text!r} is not a phone number ({_parse_reason(exc)})") from None
    if number.extension:
        raise ValueError(f"{text!r} has an extension: a text message cannot reach one")
    reason = phonenumbers.is_possible_number_with_reason(number)
    if reason not in (ValidationResult.IS_POSSIBLE, ValidationResult.IS_POSSIBLE_LOCAL_ONLY):
        why = _IMPOSSIBLE.get(reason, "no numbering plan allows it")
        raise ValueError(f"{text!r} is not a possible phone number: {why}")
    if reason == ValidationResult.IS_POSSIBLE_LOCAL_ONLY:
        raise ValueError(f"{text!r} is a local number: write it with its area code")
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def check_region(region: str) -> str:
    """A default phone region that phonenumbers knows (upper-cased); ValueError otherwise."""
    code = region.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"{region!r} is not a region code phonenumbers knows (like GB or US)")
    return code


def _parse_reason(exc: NumberParseException) -> str:
    reasons = {
        NumberParseException.INVALID_COUNTRY_CODE: "its country code is not one in use",
        NumberParseException.NOT_A_NUMBER: "it is not a number",
        NumberParseException.TOO_SHORT_NSN: "it is too short",
        NumberParseException.TOO_SHORT_AFTER_IDD: "it is too short after the international prefix",
        NumberParseException.TOO_LONG: "it is too long",
    }
    return reasons.get(exc.error_type, str(exc))
