"""Typed, validated recipe configs: one module per section, a loader with overrides and clear errors."""

from ftscale.config.loader import ConfigError, load_config, render_config
from ftscale.config.method import PROMPT_METHODS
from ftscale.config.root import FtscaleConfig

__all__ = ["ConfigError", "FtscaleConfig", "PROMPT_METHODS", "load_config", "render_config"]
