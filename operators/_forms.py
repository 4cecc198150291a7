"""Form pieces shared by the operators (validation messages shown under the inputs)."""

from __future__ import annotations

import fiftyone.operators.types as types


def device_and_batch(inputs: types.Object, batch_size: int) -> None:
    """Device and batch-size inputs."""
    inputs.str("device", default="auto", label="Device",
               description="'auto' uses CUDA when present, else CPU; or 'cpu', 'cuda:0', ...")
    inputs.int("batch_size", default=batch_size, label="Batch size", min=1)


def check_key(prop, value: str | None, taken: list[str], what: str) -> bool:
    """Mark ``prop`` invalid with a message; returns whether the key is usable."""
    if not value or not value.isidentifier():
        prop.invalid = True
        prop.error_message = "Use letters, digits and underscores (not starting with a digit)"
        return False
    if value in taken:
        prop.invalid = True
        prop.error_message = f"{what} '{value}' already exists: choose another key or tick overwrite"
        return False
    return True


def dropdown(inputs: types.Object, name: str, values: list[str], default: str | None, label: str,
             description: str | None = None, required: bool = False):
    """An enum input shown as a dropdown whose labels are the values themselves."""
    choices = types.Dropdown()
    for v in values:
        choices.add_choice(v, label=v)
    return inputs.enum(name, choices.values(), default=default, required=required, label=label,
                       description=description, view=choices)


def nothing_to_choose(inputs: types.Object, name: str, title: str, message: str, form_label: str):
    """A form that only says what is missing (e.g. no fitted expert) and cannot be submitted."""
    prop = inputs.view(name, types.Warning(label=title, description=message))
    prop.invalid = True
    prop.error_message = message
    return types.Property(inputs, view=types.View(label=form_label))
