"""Typed recipe schema, Hydra composition, validation and token-budget parsing."""

from evolm_nemo.config.compose import compose, to_dict
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.tokens import format_tokens, iterations_for, parse_tokens
from evolm_nemo.config.validate import Plan, validate

__all__ = ["ConfigError", "Plan", "RootConfig", "compose", "format_tokens", "iterations_for", "parse_tokens",
           "to_dict", "validate"]
