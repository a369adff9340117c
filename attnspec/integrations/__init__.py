"""Integrations of attnspec with other libraries. Each submodule imports its library lazily
(importing attnspec.integrations imports none of them)."""
