"""Coordinator side of fedhosp: the ServerApp, strategies, MLflow tracking, the CLI."""
