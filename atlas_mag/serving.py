"""Serving a model folder written by `atlas_mag.hub.save_model_folder` with Transformers' own OpenAI-compatible
server, `transformers serve` (its FastAPI app, its /v1/completions and /v1/chat/completions endpoints, its
generation code): this module only lets that server load the folder.

The one obstacle: `transformers serve <folder> --trust-remote-code` stops while loading with
`AttributeError: module transformers has no attribute AtlasMAGForCausalLM`. Its model manager
(`transformers/cli/serving/model_manager.py`, `ModelManager._load_model`, line 319 in 5.24.0) loads the config
with `trust_remote_code`, then looks the class up by name on the `transformers` package:

    architecture = getattr(transformers, config.architectures[0])

which only finds classes that ship with Transformers, never a `trust_remote_code` class that the folder's
`auto_map` names. The one-line upstream change that would make this module unnecessary:

    architecture = getattr(transformers, config.architectures[0], None) or AutoModelForCausalLM

`install_remote_code_lookup` does exactly that from the outside: inside that module, the name `transformers`
becomes a stand-in that answers every name as the package does, and a name the package lacks with
`AutoModelForCausalLM`, which loads the class the folder's `auto_map` names, with the same arguments the
manager passes. Everything else is upstream's, so the other options of `transformers serve` work as documented.

The hooked internals (`transformers.cli.serving.model_manager` and its module global `transformers`,
`transformers.cli.transformers.app`) exist from transformers 5.6.0 on, the first release with the serving
package and /v1/completions (5.5.0 has the package but no /v1/completions, 5.1.0 a single `cli/serve.py`);
the `serving` extra asks for 5.24, the release they are tested on. On a release without them this module
stops with an error that names the installed release.

Limits, all upstream's:
- One request at a time: each model gets one inference thread (`GenerateManager`/`InferenceThread`,
  `transformers/cli/serving/utils.py`), and each request is one `generate` call with its own `AtlasMAGCache`, so
  concurrent requests queue and answer exactly what they answer alone.
- No continuous batching: `--continuous-batching` packs requests into one batch over a `PagedAttentionCache`,
  which pages attention keys and values only; the memory each sequence learns has no place in it
  (`AtlasMAGForCausalLM.init_continuous_batching` refuses, and `serve` refuses the flag up front). It would need
  a per-request state slot in the paged cache (allocated and freed by the scheduler like KV blocks), and a
  forward over a packed batch that updates each request's memory at its own chunk boundaries.
- Generation parameters are checked only inside `generate`: the handlers copy `max_tokens` into the
  GenerationConfig unchecked (`transformers/cli/serving/completion.py`, lines 268-269 in 5.24.0), so a request
  that generate refuses (`max_tokens: -1`) fails in the inference thread as a bare 500 "Internal Server Error"
  (and mid-stream for a streamed one). `install_generation_parameter_check` runs the same check
  (`GenerationConfig.validate`) in each endpoint's `_build_generation_config`, before anything is generated, so
  such a request gets a 400 with the message, streamed or not. Unknown fields get upstream's 422 naming them.
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoModelForCausalLM

from .cli import local_or_hub
from .configuration_atlas import AtlasMAGConfig
from .modeling_atlas import CONTINUOUS_BATCHING_UNSUPPORTED

# The releases whose serve internals this module hooks (see the module docstring); setup.cfg's `serving` extra.
SERVE_RELEASES = "transformers>=5.24,<6"


class _TransformersWithAutoFallback:
    """Stands in for the `transformers` package inside the serve model manager: every name the package has, and
    `AutoModelForCausalLM` for an architecture it lacks (a `trust_remote_code` class such as AtlasMAGForCausalLM)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(transformers, name)
        except AttributeError:
            return AutoModelForCausalLM


def serve_internals() -> tuple[Any, Any]:
    """The installed `transformers serve` model-manager module and CLI app, or an error naming the release when
    they are missing (too old or too new a release) or the serving dependencies are not installed."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError(
            "Serving needs FastAPI, Uvicorn and the OpenAI client: pip install 'atlas-mag[serving]' (or "
            "'transformers[serving]')"
        )
    problem = None
    try:
        from transformers.cli import transformers as cli
        from transformers.cli.serving import model_manager
    except ImportError as error:
        problem = f"cannot import its serving package ({error})"
    else:
        looked_up_on = getattr(model_manager, "transformers", None)
        if looked_up_on is not transformers and not isinstance(looked_up_on, _TransformersWithAutoFallback):
            problem = "transformers.cli.serving.model_manager no longer looks architectures up on `transformers`"
        elif not hasattr(model_manager.ModelManager, "_load_model") or not hasattr(cli, "app"):
            problem = "ModelManager._load_model or the CLI app is missing"
    if problem is not None:
        raise RuntimeError(
            f"atlas_mag.serving hooks the internals of `transformers serve` of {SERVE_RELEASES}; transformers "
            f"{transformers.__version__} is installed and {problem}"
        )
    return model_manager, cli.app


def install_remote_code_lookup() -> None:
    """Let `transformers serve` load `trust_remote_code` architectures through `AutoModelForCausalLM` (see the
    module docstring). For the whole process (a model unloaded after `--model-timeout` or by /reset is loaded
    again later); installing it again changes nothing."""
    model_manager, _ = serve_internals()
    if not isinstance(model_manager.transformers, _TransformersWithAutoFallback):
        model_manager.transformers = _TransformersWithAutoFallback()


def _checked(build_generation_config: Callable[..., Any]) -> Callable[..., Any]:
    """`build_generation_config` followed by `GenerationConfig.validate`, its ValueError answered as a 400."""

    @functools.wraps(build_generation_config)
    def checked(handler: Any, body: dict, *args: Any, **kwargs: Any) -> Any:
        from fastapi import HTTPException

        generation_config = build_generation_config(handler, body, *args, **kwargs)
        try:
            generation_config.validate()
        except ValueError as error:
            raise HTTPException(status_code=400, detail=f"Invalid generation parameters: {error}") from error
        return generation_config

    checked.checks_generation_parameters = True
    return checked


def install_generation_parameter_check() -> None:
    """Check every request's generation parameters before generating (see the module docstring), for the
    completions, chat completions and responses endpoints; installing it again changes nothing."""
    serve_internals()
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler

    for handler in (CompletionHandler, ChatCompletionHandler, ResponseHandler):
        build = vars(handler).get("_build_generation_config")
        if build is None:
            raise RuntimeError(
                f"atlas_mag.serving hooks the internals of `transformers serve` of {SERVE_RELEASES}; in transformers "
                f"{transformers.__version__}, {handler.__name__} builds no GenerationConfig of its own"
            )
        if not getattr(build, "checks_generation_parameters", False):
            handler._build_generation_config = _checked(build)


def is_atlas_mag(model: str) -> bool:
    """Whether the local folder `model` holds an Atlas-MAG model (a Hub id is read by the server itself)."""
    config = Path(model) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == AtlasMAGConfig.model_type


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, passthrough: Sequence[str] = ()) -> None:
    """Run `transformers serve <model> --trust-remote-code --host HOST --port PORT <passthrough>` in this process
    until it is stopped, pinned to `model` (a folder written by `save_model_folder`, or a Hub id): the upstream
    CLI and server, with `install_remote_code_lookup` installed; `passthrough` takes any other option of
    `transformers serve` (`--device`, `--dtype`, `--log-level`, ...)."""
    model = local_or_hub(model, "model")
    if any(arg.startswith("--continuous-batching") for arg in passthrough) and is_atlas_mag(model):
        raise SystemExit(f"error: {CONTINUOUS_BATCHING_UNSUPPORTED}")
    install_remote_code_lookup()
    install_generation_parameter_check()
    _, app = serve_internals()
    command = ["serve", model, "--trust-remote-code", "--host", host, "--port", str(port), *passthrough]
    app(command, prog_name="transformers")


# Clients of a served model (tests/test_serving.py, scripts/benchmark_serving.py).


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(url: str, timeout: float = 60) -> int:
    """The HTTP status of GET `url`/health."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_until_healthy(url: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    """Return once `url`/health answers 200; raise if `process` (the server) exits first or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before answering")
        try:
            if health(url, timeout=2) == 200:
                return
        except OSError:  # not listening yet (connection refused or reset)
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server at {url} did not answer /health within {timeout:.0f}s")


@contextmanager
def running_server(
    command: Sequence[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `command` (a server listening on 127.0.0.1:`port`, such as scripts/serve.py) with its output in the
    file `log` (a pipe nobody reads would fill and block it), and yield the process and its base URL once it is
    healthy; the server is stopped (terminated, then killed) when the block ends. Errors quote the log's end."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, process=process)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}; its output ends with:\n{log.read_text()[-3000:]}") from None
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
