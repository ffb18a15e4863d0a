"""Tiny dense model that trains on 2 CPU cores in a few minutes on the default corpus."""

from configs.base import base_config


def get_config():
  c = base_config()
  return c
