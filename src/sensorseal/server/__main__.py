"""`python -m sensorseal.server --data-dir D --http-port N`: the HTTP server without the CLI."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sensorseal.core.errors import ConfigError
from sensorseal.server.run import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensorseal.server",
                                     description="Run the sensorseal HTTP ingest server.")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="an initialized sensorseal data directory")
    parser.add_argument("--http-port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--certfile", type=Path, help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--keyfile", type=Path, help="PEM private key of --certfile")
    args = parser.parse_args(argv)
    if not 0 <= args.http_port <= 65535:
        parser.error("--http-port must be between 0 and 65535")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.data_dir, host=args.host, port=args.http_port, certfile=args.certfile,
              keyfile=args.keyfile)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: uvicorn already shut down gracefully
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
