"""The only package that speaks SQL: pool, migrations, idempotent COPY ingest, queries."""
