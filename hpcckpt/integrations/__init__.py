"""Launchers and frameworks that hpcckpt plugs into: submitit today."""
