"""Tokenizer and request validation for the ensemble; plain Python, importable without Triton."""
