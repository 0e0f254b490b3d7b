"""Narrow adapters that turn the core's micro-batches into log-probs, gradients and optimizer steps.

Installed as ``redi.backends``; never as a top-level ``backends`` package.
"""
