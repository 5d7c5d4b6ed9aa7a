"""Airflow-free core of the provider: policy, budgets, redaction, audit and LLM call logic.

Nothing in this package imports Airflow, so every rule can be tested as plain Python.
"""
