"""Run the API under uvicorn: `run(host, port, settings)` blocks until interrupted."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from api.settings import ApiSettings


def run(host: str, port: int, settings: ApiSettings, *, log_level: str = "info") -> None:
    """Serve create_app(settings) on host:port (one process; uvicorn handles signals)."""
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        proxy_headers=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="nbmeter billing API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log-level", default="info")
    ns = parser.parse_args()
    run(ns.host, ns.port, ApiSettings(), log_level=ns.log_level)
