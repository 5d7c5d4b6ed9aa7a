"""airflow-provider-governed-ai: governed AI pipelines on Apache Airflow."""

__version__ = "0.1.0"
