"""Text fields of request bodies: JSON can carry lone surrogates (``"\\udcff"``), which are no text and cannot
travel as UTF-8, so every string the API forwards is checked for them (a 400 naming the field)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]
