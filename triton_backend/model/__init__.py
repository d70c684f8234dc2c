"""The model layer: Megatron-core's GPT with an attention that reads the KV cache (no scheduling here)."""
