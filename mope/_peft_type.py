"""The two places where mope relies on PEFT internals, checked when `mope` is imported.

1. The name "MOPE". PEFT 0.21 keeps its method names in a closed ``str`` enum
   (``peft.utils.PeftType``) and ``register_peft_method`` refuses any name that is not a member,
   so an out-of-tree method has to add one: `ensure_mope_peft_type` does, by writing the enum's
   member maps.
2. The load hook. ``BaseTuner._remap_adapter_state_dict_for_load`` (a classmethod every adapter
   load goes through, new in PEFT 0.21) is where `MoPEModel` refuses adapter weights that do not
   match their config; PEFT 0.20 has no such hook and would load them with random experts.

Known to work: peft 0.21.0, 0.21.1 and 0.21.2 (the whole mope test suite); 0.20.0 lacks the load
hook. If a future PEFT makes the enum open or drops the hook, importing mope fails with a message
that says what to do instead of a confusing ``KeyError`` or a silent random-expert load.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType

from mope.errors import MoPEError

MOPE = "MOPE"
SUPPORTED_PEFT = "peft>=0.21,<0.22"
_LOAD_HOOK = "_remap_adapter_state_dict_for_load"


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
            f"({type(exc).__name__}: {exc}); mope is tested with peft 0.21. Install {SUPPORTED_PEFT} "
            "or check whether this PEFT registers out-of-tree methods another way."
        ) from exc
    return member


def check_peft_load_hook(tuner_base: type = BaseTuner) -> None:
    """Check that PEFT calls the tuner hook through which `MoPEModel` checks loaded adapter weights.

    Args:
        tuner_base: the tuner base class to inspect; PEFT's own ``BaseTuner`` (a parameter so that
            the failure path can be tested).

    Raises:
        MoPEError: when the installed PEFT has no such hook, so loading could not be checked.
    """
    if not callable(getattr(tuner_base, _LOAD_HOOK, None)):
        import peft

        raise MoPEError(
            f"peft {getattr(peft, '__version__', '?')} has no BaseTuner.{_LOAD_HOOK}, the hook through which mope "
            "refuses adapter weights that do not match their adapter_config.json; without it a mismatched "
            f"adapter would load with randomly initialised experts. Install {SUPPORTED_PEFT}."
        )
