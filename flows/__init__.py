"""Prefect flows: thin wrappers over alflow functions."""
