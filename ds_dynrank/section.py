"""The strict pydantic base of every part of the `"dynrank"` section: the core fields and each method's own knobs.

No torch here: a bad config must be refused in about a second, before torch, transformers and DeepSpeed load.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors, values are frozen, and each field's docstring is its documentation."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}: {pattern!r} is not a valid regular expression ({err})") from None
