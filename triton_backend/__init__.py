"""Megatron-core GPT generation model served through PyTriton (rank 0) with tensor-parallel followers."""
