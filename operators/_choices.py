"""Choices of a fitted expert (or scoring run) in the operators' forms, checked against the dataset.

The App offers only the dataset's experts in a dropdown, but ``foo.execute_operator`` (Python) takes any
value: FiftyOne's own check of an enum input answers only "Invalid enum value". These helpers mark the
input invalid with a message that names what was asked for and what exists, which FiftyOne returns as
the validation error's reason (``ExecutionError: Validation error. Path: expert. Reason: no fitted expert
named 'x' on dataset 'parts'; fitted experts: padim, patchcore``) and the App shows under the input.
"""

from __future__ import annotations

from collections.abc import Sequence


def unknown_choice(value, choices: Sequence[str], *, what: str, dataset_name: str, none: str | None = None,
                   hint: str = "") -> str | None:
    """Why ``value`` is not one of ``choices`` (None when it is, or when nothing was chosen).

    Args:
        value: what the caller asked for (a string, or a list of strings for a multi-choice input).
        choices: the names that exist on the dataset.
        what: the kind of thing, singular and plural separated by ``|`` (``"fitted expert|fitted experts"``).
        dataset_name: the dataset's name, for the message.
        none: a value that means "no choice" (e.g. ``"(none)"``), always accepted.
        hint: appended to the message (e.g. how to make one).
    """
    if value is None or value == none:
        return None
    asked = value if isinstance(value, (list, tuple)) else [value]
    unknown = [v for v in asked if v not in choices]
    if not unknown:
        return None
    one, many = what.split("|")
    named = ", ".join(repr(v) for v in unknown)
    listed = ", ".join(choices) if choices else "none"
    msg = f"no {one} named {named} on dataset {dataset_name!r}; {many}: {listed}"
    return f"{msg} ({hint})" if hint else msg


def check_choice(prop, value, choices: Sequence[str], *, what: str, dataset, none: str | None = None,
                 hint: str = "") -> bool:
    """Mark the input ``prop`` invalid when ``value`` is not one of ``choices``; returns whether it is usable.

    See :func:`unknown_choice` for the arguments (``dataset``: the operator's ``ctx.dataset``).
    """
    reason = unknown_choice(value, choices, what=what, dataset_name=dataset.name if dataset else "",
                            none=none, hint=hint)
    if reason is None:
        return True
    prop.invalid = True
    prop.error_message = reason
    return False


#: ``what`` for :func:`check_choice` of a fitted expert
EXPERT = "fitted expert|fitted experts"
#: ``what`` for :func:`check_choice` of a scoring run (the judge's expert run)
SCORE_RUN = "expert scoring run|scoring runs"
