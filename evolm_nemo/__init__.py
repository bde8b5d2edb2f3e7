"""evolm-nemo: EvoLM's four training stages on one megatron-core engine, plus HF export and evaluation."""

__version__ = "0.1.0"
