# MLflow tracking server with the PostgreSQL driver, pinned to the version in pyproject.toml.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13
