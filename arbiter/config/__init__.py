"""gows.conf.json: the declared settings (settings.py), how a value is checked (kinds.py), loading
(load.py) and the published JSON Schema (schema.py, `python -m arbiter.config.schema`).

This package is the config layer: the proxy and the socket code never import it.
"""
from ..addresses import Address, WorkerAddress
from .kinds import STDOUT, ConfigError
from .load import bind_configured, configured, listen_key, load, load_data
from .settings import (Config, FrontCacheConfig, HealthCheckConfig, LoggingConfig, OutlierDetectionConfig,
                       ProxyConfig, RestartBackoffConfig, WorkerCacheConfig)

__all__ = ["Address", "WorkerAddress", "STDOUT", "ConfigError", "bind_configured", "configured", "listen_key", "load",
           "load_data", "Config", "FrontCacheConfig", "HealthCheckConfig", "LoggingConfig", "OutlierDetectionConfig",
           "ProxyConfig", "RestartBackoffConfig", "WorkerCacheConfig"]
