"""Teach PEFT the name "MOPE".

PEFT 0.21 keeps its method names in a closed ``str`` enum (``peft.utils.PeftType``) and
``register_peft_method`` refuses any name that is not a member, so an out-of-tree method has to
add one. This module is the only place that touches PEFT internals to do so; if a future PEFT
makes the enum open (or stops accepting this), :func:`ensure_mope_peft_type` fails with a
message that says what to do instead of a confusing ``KeyError`` later.
"""

from __future__ import annotations

from peft.utils import PeftType

from mope.errors import MoPEError

MOPE = "MOPE"


def ensure_mope_peft_type(peft_type_enum: type = PeftType) -> PeftType:
    """Return ``PeftType.MOPE``, adding the member to PEFT's enum the first time.

    Args:
        peft_type_enum: the enum to extend; PEFT's own ``PeftType`` (a parameter so that the
            failure path can be tested on an enum of another shape).

    Raises:
        MoPEError: when the installed PEFT's ``PeftType`` cannot be extended this way.
    """
    try:
        existing = peft_type_enum._value2member_map_.get(MOPE)
        if existing is not None:
            return existing
        # A str-mixin enum member is a str instance carrying _name_ / _value_; the three maps below
        # are what Enum's lookup (PeftType("MOPE"), PeftType["MOPE"], list(PeftType)) reads.
        member = str.__new__(peft_type_enum, MOPE)
        member._name_ = MOPE
        member._value_ = MOPE
        member.__objclass__ = peft_type_enum
        type.__setattr__(peft_type_enum, MOPE, member)
        peft_type_enum._member_map_[MOPE] = member
        peft_type_enum._value2member_map_[MOPE] = member
        peft_type_enum._member_names_.append(MOPE)
        if not (peft_type_enum(MOPE) is member and peft_type_enum[MOPE] is member and member in list(peft_type_enum)):
            raise TypeError("the added member is not found by value, by name or by iteration")
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        raise MoPEError(
            "could not add 'MOPE' to peft.utils.PeftType on this PEFT version "
            f"({type(exc).__name__}: {exc}); mope is tested with peft 0.21. Install peft>=0.21,<0.22 "
            "or check whether this PEFT registers out-of-tree methods another way."
        ) from exc
    return member
