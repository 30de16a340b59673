"""Configuration: settings, the Celery configuration, logging and Redis key names."""

from config.settings import PRIORITY_NAMES, Settings

__all__ = ["PRIORITY_NAMES", "Settings"]
