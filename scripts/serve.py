"""Serve a saved model folder with Transformers' own OpenAI-compatible server (`transformers serve`): POST
/v1/completions and /v1/chat/completions (streaming or not), GET /v1/models and /health. Options this script does
not know go to `transformers serve` as they are (see `transformers serve --help`); TTL stays on, so the memory
learns on every request's prompt and answer, in that request's own cache.

    python scripts/serve.py outputs/main_job/atlas-mag-recall --port 8000
    python scripts/serve.py path/to/folder --host 0.0.0.0 --log-level info --device cpu

Needs the `serving` extra: pip install -e ".[serving]".
"""

from __future__ import annotations

import argparse

from atlas_mag.serving import serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a folder written by save_model_folder (or a Hub repository id)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    args, passthrough = parser.parse_known_args()
    try:
        serve(args.model, args.host, args.port, passthrough)
    except FileNotFoundError as error:  # no such folder (for `make serve`: run `make main` first, or pass MODEL=)
        parser.error(str(error))


if __name__ == "__main__":
    main()
