"""Run the API under uvicorn: `run(host, port, settings)` blocks until interrupted."""

from __future__ import annotations

import os
from typing import Any

import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.settings import ApiSettings


def app_from_env() -> FastAPI:
    """The app with settings from the environment (each worker process builds its own)."""
    return create_app(ApiSettings())


def run(
    host: str, port: int, settings: ApiSettings, *, log_level: str = "info", workers: int = 1
) -> None:
    """Serve create_app(settings) on host:port; uvicorn handles signals.

    workers > 1 forks that many processes sharing the port, each with its own pool of
    `api_pool_max` connections (settings pass through the environment). Each answers
    /metrics with its own counters: scrape workers apart, or run one worker per port.
    """
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "access_log": False,
        "proxy_headers": False,
        "lifespan": "on",
        # longer than the idle timeout of clients and proxies in front (nginx: 75 s), so the
        # server never closes an idle connection just as a client reuses it (the client
        # then sees a reset: httpx.ReadError / RemoteProtocolError)
        "timeout_keep_alive": 90,
    }
    if workers > 1:
        os.environ.update(
            {f"NBMETER_{k.upper()}": str(v) for k, v in settings.model_dump().items()}
        )
        uvicorn.run("api.serve:app_from_env", factory=True, workers=workers, **options)
    else:
        uvicorn.Server(uvicorn.Config(create_app(settings), **options)).run()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="nbmeter billing API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--workers", type=int, default=1)
    ns = parser.parse_args()
    run(ns.host, ns.port, ApiSettings(), log_level=ns.log_level, workers=ns.workers)
