"""Measuring this machine and this model for the offloading runtime."""
