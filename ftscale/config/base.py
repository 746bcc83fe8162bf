"""The base class every config section derives from: strict, typed, and described."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section. Unknown keys are errors (typos must never be silently ignored); so are NaN and infinity."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False, allow_inf_nan=False)
