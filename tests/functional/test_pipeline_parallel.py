"""Pipeline stages served through Triton: every layout gives the text one rank gives, from either checkpoint format
and from a checkpoint saved in stages (legacy ``mp_rank_TT_PPP``)."""

from __future__ import annotations

import pytest

from .test_tensor_parallel import DEMO, assert_same, make_checkpoint, reference, serve_and_collect  # noqa: F401

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("tp, pp", [(1, 2), (1, 4)])
def test_ensemble_text_is_identical_in_every_pipeline_layout(tmp_path, reference, tp, pp):  # noqa: F811
    # the demo model has four layers: PP=4 is one layer per stage, the embedding and the output layer apart
    assert_same(serve_and_collect(tmp_path, f"tp{tp}pp{pp}", TP=str(tp), PP=str(pp)), reference, f"TP={tp} x PP={pp}")


def test_a_checkpoint_saved_in_stages_serves_in_stages(tmp_path, reference):  # noqa: F811
    ckpt = make_checkpoint(tmp_path / "demo_pp2", 2, "--from", str(DEMO / "checkpoint"), "--format", "legacy",
                           "--pp", "2")
    assert sorted(p.name for p in (ckpt / "iter_0000001").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    # served whole (PP=1) it is read back in tests/unit/test_pipeline_stages.py
    assert_same(serve_and_collect(tmp_path, "staged_tp2pp2", TP="2", PP="2", CHECKPOINT=str(ckpt), PP_MICROBATCHES="1"),
                reference, "a PP=2 checkpoint served at TP=2 x PP=2")


def test_a_layout_the_model_cannot_split_is_refused_at_start(tmp_path):
    from .conftest import start_server

    with pytest.raises(RuntimeError, match="server exited with 2"):
        start_server(tmp_path / "pp3", launch=True, PP="3")
    log = (tmp_path / "pp3" / "server.log").read_text()
    assert "cannot be served at PP=3: num_layers=4 cannot be split in 3 pipeline stages" in log
