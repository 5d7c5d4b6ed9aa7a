"""The Airflow UI side of the provider: a plugin with the audit and spend page, its API and extra links.

Airflow imports :mod:`governed_ai.plugins.plugin` in every process; it stays light. The API
(:mod:`governed_ai.plugins.api`) is imported only when the API server first serves it.
"""
