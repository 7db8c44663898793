"""Reading and checking the options a writer is given, before anything is read or written.

Every numeric option is checked for its range up front (a NaN router std would write a model that
outputs NaN; a zero count would fail deep inside the plan), with one line naming the option as the
caller spells it (`upcycle.errors.flag`).
"""

from __future__ import annotations

import math
import re

from upcycle.errors import UpcycleError, flag


def check_count(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """Return `value` if it is an int in [minimum, maximum].

    Raises:
        UpcycleError: it is not an int, or out of range (the message names the option).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise UpcycleError(f"{flag(name)} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise UpcycleError(f"{flag(name)} must be {bounds}, got {value}")
    return value


def check_real(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """Return `value` as a float if it is a finite number within the bounds (minimum excluded when
    `exclusive_minimum`).

    Raises:
        UpcycleError: it is not a number, not finite (nan, inf), or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpcycleError(f"{flag(name)} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise UpcycleError(f"{flag(name)} must be a finite number, got {value}")
    too_small = minimum is not None and (number <= minimum if exclusive_minimum else number < minimum)
    if too_small or (maximum is not None and number > maximum):
        low = "" if minimum is None else f"{'above' if exclusive_minimum else 'at least'} {minimum:g}"
        high = "" if maximum is None else f"at most {maximum:g}"
        raise UpcycleError(f"{flag(name)} must be {' and '.join(part for part in (low, high) if part)}, got {value}")
    return number


def parse_moe_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """Return the sorted MoE layer indices that `spec` names: "all", "every:N" (layers N-1, 2N-1,
    ..., as transformers' decoder_sparse_step), "0,4,8", "0-3", "2-" (layer 2 to the last), or a
    list of ints.

    Raises:
        UpcycleError: the spec cannot be read, names a layer out of range, or selects none.
    """
    if isinstance(spec, (list, tuple)):
        layers = {int(layer) for layer in spec}
    elif spec.strip() == "all":
        layers = set(range(num_layers))
    elif spec.strip().startswith("every:"):
        step = spec.strip()[len("every:") :]
        if not step.isdigit() or int(step) < 1:
            raise UpcycleError(f"cannot read {flag('moe_layers')} {spec!r}: every:N needs a positive N, e.g. every:2")
        layers = set(range(int(step) - 1, num_layers, int(step)))
    else:
        layers = set()
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?", part)
            if not match:
                raise UpcycleError(
                    f"cannot read {flag('moe_layers')} {spec!r}: use all, every:N, or indices like 0,4,8, 0-3 or 2-"
                )
            first = int(match.group(1))
            last = int(match.group(3)) if match.group(3) else (num_layers - 1 if match.group(2) else first)
            layers.update(range(first, last + 1))
    outside = sorted(layer for layer in layers if not 0 <= layer < num_layers)
    if outside:
        raise UpcycleError(f"{flag('moe_layers')} names layers {outside}; the model has layers 0-{num_layers - 1}")
    if not layers:
        raise UpcycleError(f"{flag('moe_layers')} {spec!r} selects no layer")
    return sorted(layers)


def given_options(options: dict[str, bool]) -> list[str]:
    """Return the options (Python names -> whether the caller set them) that were set, spelled as the
    caller knows them (`upcycle.errors.flag`)."""
    return [flag(name) for name, is_given in options.items() if is_given]


def check_expert_groups(groups: int, top_groups: int, experts: int, top_k: int, group_size: int, copies: int) -> None:
    """Check group-limited routing (DeepSeek-V3's n_group/topk_group) over `experts` routed experts
    of which a token uses `top_k`; `group_size` consecutive experts are one FFN copy's shards
    (granular's virtual groups; 1 otherwise) and `copies` is the requested expert count.

    Each router group must hold whole virtual groups, so that top-k keeps picking whole copies,
    at least 2 experts (a group scores the sum of its two best), and the `top_groups` chosen
    groups must hold at least `top_k` experts.

    Raises:
        UpcycleError: a count out of range, or groups that do not split the experts as above.
    """
    check_count("expert_groups", groups)
    check_count("top_groups", top_groups, 1, groups)
    if copies % groups:
        raise UpcycleError(
            f"{flag('experts')} {copies} do not split into {flag('expert_groups')} {groups} equal groups"
            + (" of whole FFN copies" if group_size > 1 else "")
            + f"; choose a number of groups that divides {copies}"
        )
    per_group = experts // groups
    if per_group < 2:
        raise UpcycleError(
            f"{flag('expert_groups')} {groups} leaves {per_group} expert per group; the router scores a group by its "
            f"two best experts, so use at most {experts // 2} groups"
        )
    if top_k > top_groups * per_group:
        raise UpcycleError(
            f"{flag('top_groups')} {top_groups} of {per_group} experts each cannot hold the {top_k} experts a token "
            f"uses; raise {flag('top_groups')} or lower {flag('top_k')}"
        )
