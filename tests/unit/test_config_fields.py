"""Every field of megatron-core's TransformerConfig is read, refused, or declared harmless with a reason: a
megatron-core upgrade that adds one fails here until someone decides what serving does with it."""

import dataclasses

from triton_backend.model import config_fields
from triton_backend.model.architecture import NOT_SERVED


def test_every_transformer_config_field_is_accounted_for():
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    harmless = set().union(*config_fields.HARMLESS.values())
    known = config_fields.READ | set(config_fields.REFUSED) | harmless
    assert not names - known, f"TransformerConfig fields nobody decided on: {sorted(names - known)}"
    assert not known - names, f"fields megatron-core no longer has: {sorted(known - names)}"
    groups = [config_fields.READ, set(config_fields.REFUSED), *config_fields.HARMLESS.values()]
    assert sum(map(len, groups)) == len(known), "a field is in two groups"


def test_every_refused_field_is_checked_at_start():
    assert set(config_fields.REFUSED.values()) <= set(NOT_SERVED)
