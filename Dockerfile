# The collector and API image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY nbmeter nbmeter
COPY collector collector
COPY devices devices
COPY decoder decoder
COPY storage storage
COPY api api
COPY simulator simulator
RUN pip install --no-cache-dir . && useradd --system nbmeter
USER nbmeter
