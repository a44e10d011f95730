"""seedtok — a SEED-style causal 1D semantic image tokenizer."""
