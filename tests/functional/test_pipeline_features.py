"""Every serving feature at PP=2 with two batches in flight: the streaming, sampling, scoring, prefix-caching,
cancellation and structured-output tests of the one-rank server, run again here against a two-stage server of
the same model."""

from __future__ import annotations

import pytest

from .conftest import start_server, stop_server
from .test_api import (  # noqa: F401  (collected again here, against this module's server)
    api,
    ensemble,
    test_a_client_that_drops_a_stream_frees_its_sequence,
    test_a_stream_concatenates_to_the_unary_text,
    test_echo_with_logprobs_scores_the_prompt_as_harnesses_ask,
    test_megatron_scores_with_tokens_to_generate_0,
    test_the_ensemble_scores_prompts_and_lists_alternatives,
)
from .test_ensemble import (  # noqa: F401
    test_a_bad_request_does_not_disturb_its_batch,
    test_seeded_sampling_is_reproducible_and_seeds_differ,
    test_sixteen_concurrent_mixed_requests_are_batched,
)
from .test_streaming import (  # noqa: F401
    test_a_repeated_prompt_is_read_from_the_prefix_cache,
    test_bad_words_are_never_generated_with_or_without_a_leading_space,
    test_cancelled_streams_free_their_slots,
    test_presence_and_frequency_penalties_stop_greedy_repetition,
    test_stop_word_across_token_boundaries_stops_early_in_both_modes,
    test_streamed_deltas_concatenate_to_the_unary_text,
)
from .test_structured_outputs import (  # noqa: F401
    test_a_bad_guide_does_not_disturb_its_batch,
    test_a_guided_stream_concatenates_to_the_unary_text,
    test_each_guide_type_over_both_protocols,
    test_streamed_tool_calls_send_id_and_name_first_then_arguments,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two stages (two layers each), two batches in flight; a small prompt budget so that long prompts run in
    chunks, as on the one-rank server."""
    s = start_server(tmp_path_factory.mktemp("pp2"), PP="2", PP_MICROBATCHES="2")
    yield s
    stop_server(s)
