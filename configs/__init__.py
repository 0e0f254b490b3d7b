"""Recipes shipped with redi (installed as ``redi.configs`` so they exist outside a checkout too)."""
