"""Adapters for trainers that run their own loop (each imports its framework
only when used): `sampa_fused.integrations.huggingface`."""
