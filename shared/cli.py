"""The `vlmq` command. Each subcommand imports only what it runs."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmq", description="Asynchronous inference for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--host", help="bind address (default VLMQ_HOST or 127.0.0.1)")
    gw.add_argument("--port", type=int, help="port (default VLMQ_PORT or 8000)")
    gw.add_argument("--workers", type=int, default=1, help="gateway processes")

    wk = sub.add_parser("worker", help="run a GPU worker for one model")
    wk.add_argument("--model", help="which of VLMQ_MODEL to serve (default the first)")
    wk.add_argument(
        "--concurrency", type=int, help="jobs in flight (default VLMQ_CONCURRENCY, or twice the batch size)"
    )
    wk.add_argument("--loglevel", default="INFO")

    hooks = sub.add_parser("webhook-worker", help="run the webhook delivery worker (no model, no torch)")
    hooks.add_argument("--concurrency", type=int, help="deliveries in flight (default VLMQ_WEBHOOK_CONCURRENCY or 16)")
    hooks.add_argument("--loglevel", default="INFO")

    tiny = sub.add_parser("build-tiny-model", help="build the bundled tiny model into a directory")
    tiny.add_argument("target")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "gateway":
        import uvicorn

        from api_gateway.config import GatewaySettings

        settings = GatewaySettings()
        host = args.host or settings.host
        port = args.port or settings.port
        uvicorn.run(
            "api_gateway.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=args.workers,
            log_level="info",
            access_log=False,
        )
        return 0

    if args.command == "worker":
        from worker.app import run_worker
        from worker.config import WorkerSettings

        overrides = {}
        if args.model:
            overrides["worker_model"] = args.model
        if args.concurrency:
            overrides["concurrency"] = args.concurrency
        run_worker(WorkerSettings(**overrides), loglevel=args.loglevel)
        return 0

    if args.command == "webhook-worker":
        from worker.config import WebhookWorkerSettings
        from worker.webhooks import run_webhook_worker

        hook_overrides = {"webhook_concurrency": args.concurrency} if args.concurrency else {}
        run_webhook_worker(WebhookWorkerSettings(**hook_overrides), loglevel=args.loglevel)
        return 0

    if args.command == "build-tiny-model":
        from pathlib import Path

        from worker.engine.tiny import build_tiny_model

        print(build_tiny_model(Path(args.target)))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
