"""`prefixserve` command line: serve, worker, train, import-peft, prefixes list / export / import / delete.

prefixserve serve [--host H] [--port P] [--model M] [--store-url URL] ...   (flags mirror PREFIXSERVE_* settings)
prefixserve worker --store URL --model M                 (a training worker process; scale out by starting more)
prefixserve train [--tenant-id T] --name N --method M --data examples.jsonl [--base-url URL]
prefixserve import-peft ADAPTER_DIR --tenant-id T --name N --model M --store URL
prefixserve prefixes list [--tenant-id T] --store URL
prefixserve prefixes export TENANT NAME [--version V] -o FILE --store URL     (a file POST .../upload takes back)
prefixserve prefixes import FILE --tenant-id T --name N --store URL           (an export, into any store)
prefixserve prefixes delete TENANT NAME [--version V] --store URL             (one version, or every version)
prefixserve prefixes copy --from URL --to URL [--tenant-id T] [--name N]     (every version, numbers kept)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server import __version__
from server.settings import LOG_LEVELS, cert_reqs_choice, env_get, setting_name, unknown_env

if typing.TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger("prefixserve.cli")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
# after the shutdown grace period: how long requests ended with a 503 get to send it before connections close
FLUSH_S = 2


# ------------------------------------------------------------------------------------------------ serve
# `--store` as the worker and `prefixes` commands spell it
FLAG_ALIASES = {"store_url": ("--store",)}
# a choice flag's other spellings, as its setting takes them: vLLM's --ssl-cert-reqs is a number
CHOICE_ALIASES: dict[str, Callable[[str], str]] = {"ssl_cert_reqs": cert_reqs_choice}
# where and how `serve` listens: run-batch serves no socket, so it takes none of them (from flags or the environment)
LISTEN_FIELDS = frozenset({"host", "port", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs"})
# keys on the command line end up in `ps` output: env or file only (and never echoed in an error)
SECRET_FIELDS = frozenset({"api_keys", "admin_key"})


def _positive_float(v: str) -> float:
    x = float(v)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {v}")
    return x


def _non_negative_float(v: str) -> float:
    x = float(v)
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {v}")
    return x


def _finite_float(v: str) -> float:
    """A number JSON can carry (nan and inf cannot be sent: the server checks the range)."""
    x = float(v)
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {v}")
    return x


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def _or_none(typ: type) -> Any:
    """A flag's value converter for an optional number: the number, or `none` (None in the settings: no limit, or
    automatic, as the field says)."""

    def conv(v: str) -> Any:
        return v if v.strip().lower() == "none" else typ(v)

    conv.__name__ = f"{typ.__name__} or none"
    return conv


def _add_settings_flags(p: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    """One flag per Settings field (`--max-prompt-tokens` ↔ PREFIXSERVE_MAX_PROMPT_TOKENS) but `skip`'s; flags win
    over env."""
    from server.settings import Settings, optional_number

    for name, f in Settings.model_fields.items():
        if name in SECRET_FIELDS or name in skip:
            continue
        ann = f.annotation
        args = getattr(ann, "__args__", (ann,))
        typ = next((a for a in args if a is not type(None)), str)
        conv: Any
        if (num := optional_number(ann)) is not None:
            conv = _or_none(num)
        elif typ in (int, float):
            conv = typ
        else:
            conv = str
        env = f"PREFIXSERVE_{name.upper()}"
        # the default, as vLLM's --help shows it (argparse's own would say None: the flag's default is "not given")
        default = "" if f.default_factory is not None or f.default is None else f"; default: {f.default}"
        help_ = f"{f.description or ''} [env {env}{default}]".replace("%", "%%")
        flags = ["--" + name.replace("_", "-"), *FLAG_ALIASES.get(name, ())]
        if typ is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(ann) is typing.Literal:
            p.add_argument(*flags, dest=name, choices=list(typing.get_args(ann)), default=None, help=help_,
                           type=CHOICE_ALIASES.get(name, str))  # fmt: skip
        else:
            p.add_argument(*flags, dest=name, type=conv, default=None, help=help_)


def settings_from_args(ns: argparse.Namespace) -> Any:
    from server.settings import settings_from

    return settings_from(vars(ns))


def make_server(app: Any, settings: Any) -> Any:
    """A uvicorn Server whose first SIGTERM/SIGINT drains: /ready → 503, new requests → 503 + Retry-After,
    in-flight requests finish (up to shutdown_grace_s), then the normal uvicorn shutdown and lifespan end (a signal
    before the start-up is over exits at once, 128 + its number: nothing was served yet). A second signal ends the
    drain now: what is in flight ends with the same 503 as at the end of the grace period (not a
    cut connection), and `forced` says so (the process then exits 1); a third is uvicorn's own forced exit."""
    import uvicorn

    from server.http_protocol import HeaderDeadlineProtocol
    from server.tls import uvicorn_ssl_options

    class DrainingServer(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None
        _drain_started = False
        forced = False  # a second signal ended the drain early

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        async def startup(self, sockets: Any = None) -> None:
            state = getattr(getattr(app, "state", None), "ps", None)
            if self.config.ssl is not None and state is not None:
                # (loaded by now; the app's lifespan, run below, starts the reloader that renews its certificate)
                from server.tls import RenewableTLS

                state.tls = RenewableTLS(self.config.ssl, asyncio.get_running_loop())
            try:
                await super().startup(sockets)
            except OSError:
                # listen() lost the port: uvicorn shuts the app down on that only for sockets it binds itself
                await self.lifespan.shutdown()
                raise
            if self.started and sockets:
                # uvicorn says where it listens only for sockets it bound itself
                host, port = sockets[0].getsockname()[:2]
                log.info(
                    "listening on %s://%s:%d",
                    "https" if self.config.is_ssl else "http",
                    f"[{host}]" if ":" in host else host,
                    port,
                )

        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            if (
                self._loop is not None
                and not self.started
                and not self._drain_started
                and app.state.ps.svc is None
            ):
                # still starting (a model load can take minutes, and cannot be interrupted): nothing has been
                # served, nothing is in flight (requests were answered 503 `starting`), no training worker has
                # started (the lifespan starts them once the service is up), so nothing to drain
                log.warning("signal %s during start-up: exiting now", signal.Signals(sig).name)
                os._exit(128 + sig)
            if self._loop is None or self.forced:
                # not serving yet, or a third signal: uvicorn's own exit (forced, for a repeated SIGINT)
                super().handle_exit(sig, frame)
                return
            if self._drain_started:
                self.forced = True
                log.warning("signal %s again: ending the requests in flight now", signal.Signals(sig).name)
                self._loop.call_soon_threadsafe(self._start_cut)
                return
            self._drain_started = True
            log.info(
                "signal %s: draining for up to %.1fs", signal.Signals(sig).name, settings.shutdown_grace_s
            )
            app.state.ps.begin_drain()
            self._loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            self._drain_task = asyncio.ensure_future(self._drain())

        def _start_cut(self) -> None:
            self._cut_task = asyncio.ensure_future(self._end_in_flight("it was signalled a second time"))

        async def _drain(self) -> None:
            idle = await app.state.ps.wait_idle(settings.shutdown_grace_s)
            if not idle and not self.forced:
                log.warning("grace period over with requests in flight; ending them with a 503")
                await self._end_in_flight(f"its {settings.shutdown_grace_s:g}s grace period ran out")
            self.should_exit = True

        async def _end_in_flight(self, why: str) -> None:
            """Requests in flight end with a 503 `shutting_down` (an error event in a stream), not a cut; then
            the server stops."""
            state = app.state.ps
            if state.svc is not None:
                state.svc.engine.fail_all(f"the server is shutting down ({why}); retry", "ShuttingDown")
                await state.wait_idle(FLUSH_S)
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        # the drain above waited already: what is left (an upload, say) gets this long more, not a second grace
        timeout_graceful_shutdown=FLUSH_S,
        timeout_keep_alive=5,
        http=HeaderDeadlineProtocol,  # (a request's headers must arrive within 30 s; over TLS too)
        **uvicorn_ssl_options(settings),  # (HTTPS: uvicorn terminates TLS)
    )
    return DrainingServer(config)


def describe_settings_error(e: Exception) -> str:
    """A settings error naming what the user set (the env var and the flag), one line per field, without pydantic's
    "For further information visit ..." links."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return str(e)
    parts = []
    for err in e.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        # (with the other spelling of its flag: `worker --store` has no --store-url)
        where = " / ".join((setting_name(field), *FLAG_ALIASES.get(field, ()))) if field else "settings"
        msg = str(err["msg"])
        given = err.get("input")
        shown = ""
        if err["type"] == "value_error":  # our own checks: their messages say what was given (URLs redacted)
            msg = msg.removeprefix("Value error, ").removeprefix(f"{field}: ")
        elif (
            isinstance(given, (str, int, float)) and field not in SECRET_FIELDS and not field.endswith("_url")
        ):
            shown = f" (got {given!r})"
        parts.append(f"{where}: {msg}{shown}")
    return "; ".join(parts)


def check_model_settings(settings: Any) -> None:
    """The device, dtype and model can be used on this machine (ValueError saying why not), before anything
    loads: a bad one is a one-line error, not a traceback from the server's start-up."""
    from server.model.loader import EMBEDDED_NAME, resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    resolve_dtype(settings.dtype, device)
    if settings.kernels == "triton":
        from server.engine import triton_ops

        if not triton_ops.available(device):
            raise ValueError(f"kernels 'triton' needs triton and a CUDA device (device here: {device.type})")
    if settings.model not in ("", EMBEDDED_NAME):
        check_model_folder(Path(settings.model).expanduser(), settings.model)
    else:  # the embedded model's cache: a folder that cannot be made fails now, not after a 20 s conversion
        from server.model.loader import embedded_folder

        target = embedded_folder()
        models = target.parent
        try:
            models.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"PREFIXSERVE_CACHE: cannot make the model cache {models}: {e.strerror or e}"
            ) from None
        if not os.access(models, os.W_OK | os.X_OK) and not target.is_dir():
            raise ValueError(f"PREFIXSERVE_CACHE: the model cache {models} is not writable")


# what a Hugging Face model folder holds its weights in (one of)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def check_model_folder(folder: Path, given: str) -> None:
    """A model folder the server can load, by what it says of itself (its config, its files): ValueError naming
    what is wrong, before anything loads (a BERT folder, a config that does not parse or a folder without weights
    was a traceback from the server's start-up, seconds in)."""
    from transformers import AutoConfig

    from server.model.loader import EMBEDDED_NAME
    from server.model.spec import spec_from_config

    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model {given!r}: not {EMBEDDED_NAME!r} nor a Hugging Face model folder (no config.json)"
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # (a config that is not JSON, names no known model_type, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {given!r}: its config.json cannot be read: {first}") from None
    try:
        spec_from_config(config)
    except ValueError as e:
        raise ValueError(f"model {given!r}: {e}") from None
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ValueError(f"model {given!r}: the folder has no weights ({', '.join(WEIGHT_FILES)})")


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening: connections are refused until the model has loaded).
    Bound before anything loads, so a port in use is a one-line error at once, not after the model load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # as uvicorn does: a restart may reuse a port in TIME_WAIT (not one another process listens on)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _startup_failed(e: BaseException) -> int:
    log.error("start-up failed: %s", e)
    print(f"prefixserve: start-up failed: {e}", file=sys.stderr)
    return EXIT_STARTUP


def _ignore_hangup(*_: Any) -> None:
    log.warning(
        "SIGHUP ignored: the keys, limits and TLS files are re-read when they change (config_reload_s); SIGTERM drains "
        "and stops the server"
    )


def run_server(settings: Any, *, bundle: Any = None, store: Any = None, job_manager: Any = None) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a drain, 1 after a second signal cut it short, 3 if start-up failed."""
    from prefix_store.errors import StoreError
    from server.api import create_app
    from server.logging_utils import setup_logging
    from server.tls import check_tls_files

    setup_logging(settings.log_level, settings.log_json)
    log.info("settings: %s", json.dumps(settings.public_dict(), default=str))
    for name, close in unknown_env(os.environ):  # as vLLM warns of an unknown VLLM_* variable
        log.warning("%s is not a setting: ignored%s", name, f" (did you mean {close}?)" if close else "")
    # SIGHUP (a closed terminal, `systemctl reload`) killed the server at once, without a drain; from here on,
    # during the model load too, it is ignored
    signal.signal(signal.SIGHUP, _ignore_hangup)
    try:
        # (`serve` checked them already; here for a caller of run_server, as uvicorn's error, an SSLError, would be
        # taken for the port's below, once the model has loaded)
        check_tls_files(settings)
    except ValueError as e:
        return _startup_failed(e)
    try:
        sock = bind_listen_socket(settings.host, settings.port)
    except OSError as e:
        return _startup_failed(
            OSError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}")
        )
    try:
        try:
            app = create_app(settings, bundle=bundle, store=store, job_manager=job_manager, freeze_gc=True)
        except (ValueError, OSError, StoreError) as e:
            # a limits file that cannot be read, say: one line, no traceback
            return _startup_failed(e)
        server = make_server(app, settings)
        # uvicorn re-raises a captured signal after shutting down; a Python handler keeps that from killing us
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(sockets=[sock])
        except OSError as e:
            # listen() lost the port to a server that bound it at the same time (SO_REUSEADDR lets two bind it)
            return _startup_failed(
                OSError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}")
            )
        except SystemExit as e:
            # uvicorn exits by itself when the app's start-up fails (the lifespan logged why): our exit code
            if server.started:
                raise
            log.debug("uvicorn exited (%s) during start-up", e.code)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        sock.close()
    if not server.started:
        log.error("server failed to start")
        return EXIT_STARTUP
    return EXIT_FAIL if server.forced else EXIT_OK


def cmd_serve(ns: argparse.Namespace) -> int:
    from server.tls import check_tls_files

    try:
        settings = settings_from_args(ns)
        settings.tenant_keys()  # fail fast on a malformed key list
        check_model_settings(settings)
        check_tls_files(settings)  # (before the model loads: uvicorn reads them once it has)
    except Exception as e:
        return invalid_settings(e)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return run_server(settings)


def cmd_run_batch(ns: argparse.Namespace) -> int:
    """vLLM's `run-batch`: the OpenAI Batch JSONL file `-i` through this server's app in-process, results to `-o`;
    exit 0 once every line has its result (a request's own error is a result), 2 on bad settings or input (checked
    before the model loads, the output file's folder too), 3 if the server could not start, 1 if the results could
    not be written, 128 + the signal's number when interrupted (the lines finished by then are written)."""
    import asyncio

    from prefix_store.errors import StoreError
    from server.batch import duplicate_id, read_lines, run_batch, write_lines
    from server.logging_utils import setup_logging
    from server.settings import Settings, settings_from

    try:
        # (the environment's listening settings, TLS's included, are a server's: left at their defaults here)
        unset = {f: Settings.model_fields[f].default for f in LISTEN_FIELDS}
        settings = settings_from(vars(ns), fixed=unset)
        settings.tenant_keys()
        check_model_settings(settings)
    except Exception as e:
        return invalid_settings(e)
    setup_logging(settings.log_level, settings.log_json)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        lines = read_lines(ns.input_file)
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read {ns.input_file}: {e}", file=sys.stderr)
        return 2
    problem = None
    api_key = env_get("PREFIXSERVE_API_KEY")
    out_dir = Path(ns.output_file).resolve().parent
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        problem = "--max-concurrency must be >= 1"
    elif ns.output_file != "-" and not (out_dir.is_dir() and os.access(out_dir, os.W_OK)):
        problem = f"cannot write {ns.output_file}: {out_dir} is not a writable folder"
    elif ns.output_file != "-" and Path(ns.output_file).is_dir():
        problem = f"cannot write {ns.output_file}: it is a folder (give a file's path)"
    elif settings.auth_enabled and not api_key and settings.admin_key is None:
        problem = "this server's settings require an API key: set PREFIXSERVE_API_KEY to the tenant's key"
    elif (dup := duplicate_id(lines)) is not None:  # (OpenAI refuses such a file)
        problem = f"custom_id {dup!r} is given twice: each request's custom_id must be unique"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    signalled: list[int] = []

    async def main() -> list[dict[str, Any]]:
        # Ctrl-C / SIGTERM: the requests under way end, the lines finished by then are written; a second signal
        # exits at once, writing nothing
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def interrupted(signum: int) -> None:
            name = signal.Signals(signum).name
            if signalled:
                log.warning("signal %s again: exiting now, no results written", name)
                os._exit(128 + signalled[0])
            signalled.append(signum)
            log.warning(
                "signal %s: ending the batch (again to exit at once); the lines done are written", name
            )
            stop.set()

        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, interrupted, s)
        return await run_batch(settings, lines, concurrency=ns.max_concurrency, api_key=api_key, stop=stop)

    try:
        outputs = asyncio.run(main())
    except (ValueError, OSError, StoreError) as e:  # the model or the store could not be loaded
        return _startup_failed(e)
    try:
        write_lines(ns.output_file, outputs)
    except OSError as e:
        print(f"error: cannot write {ns.output_file}: {e}", file=sys.stderr)
        return EXIT_FAIL
    failed = sum(1 for o in outputs if o["error"] is not None or o["response"]["status_code"] >= 400)
    if signalled:
        log.warning("interrupted: %d of %d requests done (%d failed), their results in %s; the others did not "
                    "run", len(outputs), len(lines), failed, ns.output_file)  # fmt: skip
        return 128 + signalled[0]
    log.info("%d requests, %d failed; results in %s", len(outputs), failed, ns.output_file)
    return 0


# ------------------------------------------------------------------------------------------------ worker
def invalid_settings(e: Exception) -> int:
    """The one-line answer to settings that cannot be used; the usage exit code."""
    print(f"prefixserve: invalid settings: {describe_settings_error(e)}", file=sys.stderr)
    return EXIT_USAGE


def env_settings(ns: argparse.Namespace, fields: dict[str, str]) -> Any:
    """The settings a command other than `serve` uses: its flag (`fields`: setting -> flag attribute), else the
    setting's PREFIXSERVE_* variable, else its default, validated as the server validates them. Only these are
    read, so a bad variable the command does not use does not stop it. Raises ValueError (pydantic's)."""
    from server.settings import ENV_PREFIX, Settings

    for name, close in unknown_env(os.environ):  # a typo would quietly leave this command on a default
        print(f"prefixserve: {name} is not a setting: ignored{f' (did you mean {close}?)' if close else ''}",
              file=sys.stderr)  # fmt: skip
    given: dict[str, Any] = {}
    for field, attr in fields.items():
        value = getattr(ns, attr, None)
        if value is None:
            value = env_get(ENV_PREFIX + field.upper()) or None  # (in any case, as `serve` reads them)
        if value is not None:
            given[field] = value
    return Settings(_env_prefix=ENV_PREFIX + "CLI_UNREAD_", **given)


WORKER_SETTINGS = {"store_url": "store", "model": "model", "jobs_url": "jobs_url", "device": "device",
                   "dtype": "dtype", "cache": "cache", "log_level": "log_level", "log_json": "log_json",
                   "jobs_retention_s": "jobs_retention_s"}  # fmt: skip


def cmd_worker(ns: argparse.Namespace) -> int:
    from server.logging_utils import setup_logging

    try:
        st = env_settings(ns, WORKER_SETTINGS)
    except ValueError as e:
        return invalid_settings(e)
    ns.store, ns.model, ns.jobs_url, ns.device, ns.dtype, ns.cache = (
        st.store_url, st.model, st.jobs_url, st.device, st.dtype, st.cache
    )  # fmt: skip
    setup_logging(st.log_level, json_lines=st.log_json)
    try:
        from server.training import worker_main
    except ImportError as e:
        print(f"prefixserve: training is not available: {e}", file=sys.stderr)
        return EXIT_FAIL
    rc = worker_main(
        ns.store,
        ns.model,
        jobs_url=ns.jobs_url,
        device=ns.device,
        dtype=ns.dtype,
        cache_dir=ns.cache,
        train_threads=ns.threads,
        retention_s=st.jobs_retention_s,
    )
    return int(rc or 0)


# ------------------------------------------------------------------------------------------------ train
TRAIN_OPTIONS = (  # flag, type, job field, help (unset: the server's default for the method)
    ("--prefix-length", int, "prefix_length", "prefix positions P (default: the method's)"),
    ("--epochs", int, "epochs", "passes over the examples"),
    ("--lr", _finite_float, "lr", "learning rate (default: the method's)"),
    ("--batch-size", int, "batch_size", "examples per optimizer step"),
    ("--max-steps", int, "max_steps", "stop after this many optimizer steps"),
    ("--seed", int, "seed", "seed of the initialization, split and order (the same seed: the same prefix)"),
    (
        "--prompt-format",
        str,
        "prompt_format",
        "chat (the model's chat template) or raw (default: the server's)",
    ),
)


def read_examples(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(ex, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object")
            out.append(ex)
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _api_key(ns: argparse.Namespace) -> str | None:
    return ns.api_key or env_get("PREFIXSERVE_API_KEY")


def _base_url(ns: argparse.Namespace) -> str:
    return (ns.base_url or env_get("PREFIXSERVE_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")


class _HTTPError(RuntimeError):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def _permanent(e: Exception) -> bool:
    """An error that polling again will not cure: a 4xx other than 429 (the SDK's errors and ours carry it)."""
    status = getattr(e, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status != 429


def _tls_context(ns: argparse.Namespace) -> Any:
    """The client's TLS context from `--cacert` / `--cert` / `--key` (curl's names), or None when none is given
    (httpx's default trust, which takes SSL_CERT_FILE). ValueError: files that cannot be used, in one line."""
    if not (ns.cacert or ns.cert or ns.key):
        return None
    import ssl

    if ns.key and not ns.cert:
        raise ValueError("--key needs --cert (the client certificate it is the key of)")
    try:
        ctx = ssl.create_default_context(cafile=ns.cacert)  # (without --cacert: the default trust)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--cacert {ns.cacert}: {getattr(e, 'strerror', None) or e}") from None
    if ns.cert:
        try:
            ctx.load_cert_chain(ns.cert, ns.key)
        except ssl.SSLError as e:
            what = f"--cert {ns.cert}" + (f" / --key {ns.key}" if ns.key else "")
            why = "a PEM certificate and its private key (in the same file unless --key)"
            raise ValueError(f"{what}: cannot load {why}: {e}") from None
        except OSError as e:
            raise ValueError(f"--cert {ns.cert} / --key {ns.key}: {e.strerror or e}") from None
    return ctx


class _HTTPJobs:
    """Fallback when the SDK is not installed: plain httpx."""

    def __init__(self, base_url: str, api_key: str | None, tls: Any = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify = tls if tls is not None else True
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=30, verify=verify)

    def _check(self, r: Any) -> dict[str, Any]:
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except Exception:
                msg = r.text[:200]
            raise _HTTPError(r.status_code, f"HTTP {r.status_code}: {msg}")
        return r.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._check(self.client.post("/prefixes", json=spec))

    def get(self, job_id: str) -> dict[str, Any]:
        return self._check(self.client.get(f"/prefixes/jobs/{job_id}"))


def _progress(job: dict[str, Any]) -> tuple[int | None, int | None, float | None]:
    p = job.get("progress") or {}
    step = p.get("step", job.get("step"))
    total = p.get("total", p.get("total_steps", job.get("total_steps")))
    loss = p.get("loss", job.get("loss"))
    return step, total, loss


def cmd_train(ns: argparse.Namespace) -> int:
    try:
        examples = read_examples(ns.data)
    except (OSError, ValueError) as e:
        print(f"prefixserve: {e}", file=sys.stderr)
        return EXIT_USAGE
    spec: dict[str, Any] = {"tenant_id": ns.tenant_id, "name": ns.name, "examples": examples}
    if ns.method:
        spec["method"] = ns.method
    if ns.init_from:
        name, at, version = ns.init_from.partition("@")
        if at and not version.isdigit():
            print(
                f"prefixserve: --init-from {ns.init_from!r}: expected NAME or NAME@VERSION", file=sys.stderr
            )
            return EXIT_USAGE
        spec["init_from"] = {"name": name, **({"version": int(version)} if at else {})}
    for flag, _typ, fld, _help in TRAIN_OPTIONS:
        v = getattr(ns, flag[2:].replace("-", "_"))
        if v is not None:
            spec[fld] = v
    base_url, key = _base_url(ns), _api_key(ns)
    try:
        tls = _tls_context(ns)
    except ValueError as e:
        print(f"prefixserve: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = _sdk_jobs(base_url, key, tls)
    except Exception:
        client = None
    jobs = client or _HTTPJobs(base_url, key, tls)
    try:
        job = jobs.submit(spec)
    except Exception as e:
        print(f"prefixserve: submit failed: {e}", file=sys.stderr)
        return EXIT_FAIL
    job_id = job["job_id"]
    print(f"job {job_id} {job.get('status')}", file=sys.stderr)
    if ns.no_wait:
        print(json.dumps(job))
        return EXIT_OK
    return _wait(jobs, job_id, ns.poll_interval, quiet=ns.quiet, give_up_after=ns.give_up_after)


def _wait(jobs: Any, job_id: str, interval: float, quiet: bool = False, give_up_after: float = 600.0) -> int:
    """Poll the job until it ends (exit 0 if it succeeded); a server that does not answer (restarting) is polled
    on, said once on stderr, until `give_up_after` seconds without an answer (0: never)."""
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", desc=f"training {job_id}", disable=quiet, file=sys.stderr)
    job: dict[str, Any] = {}
    failing_since: float | None = None
    try:
        while True:
            try:
                job = jobs.get(job_id)
            except Exception as e:
                if _permanent(e):  # gone, or the key no longer reaches it
                    bar.close()
                    print(f"prefixserve: cannot follow job {job_id}: {e}", file=sys.stderr)
                    return EXIT_FAIL
                now = time.monotonic()
                if failing_since is None:  # transient (server restarting): keep polling, and say so once
                    failing_since = now
                    bar.clear()
                    print(f"prefixserve: the server does not answer ({e}); polling job {job_id} on"
                          + (f" for up to {give_up_after:g}s" if give_up_after else ""), file=sys.stderr)  # fmt: skip
                elif give_up_after and now - failing_since >= give_up_after:
                    bar.close()
                    print(f"prefixserve: no answer from the server for {now - failing_since:.0f}s ({e}); stopped "
                          f"waiting, job {job_id} may go on there", file=sys.stderr)  # fmt: skip
                    return EXIT_FAIL
                bar.set_postfix_str(f"poll failed: {e}")
                time.sleep(interval)
                continue
            failing_since = None
            step, total, loss = _progress(job)
            if total and bar.total != total:
                bar.total = total
            if step is not None and step > bar.n:
                bar.update(step - bar.n)
            post = {"status": job.get("status")}
            if loss is not None:
                post["loss"] = f"{loss:.4f}"
            bar.set_postfix(post)
            if job.get("status") in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        bar.close()
        print(f"\nstopped waiting; job {job_id} continues on the server", file=sys.stderr)
        return 130
    bar.close()
    print(json.dumps(job))
    if job.get("status") != "succeeded":
        print(f"job {job_id} {job.get('status')}: {job.get('error') or ''}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _sdk_jobs(base_url: str, api_key: str | None, tls: Any = None) -> Any:
    """Adapter over the `prefixserve_client` SDK (dict results), or None if it is not installed. `tls`: an
    ssl.SSLContext for its HTTP client (`_tls_context`), or None."""
    try:
        import prefixserve_client
    except ImportError:
        return None
    http = None
    if tls is not None:
        import httpx

        http = httpx.Client(verify=tls, timeout=60)
    client = prefixserve_client.Client(base_url=base_url, api_key=api_key, http_client=http)

    def as_dict(obj: Any) -> dict[str, Any]:
        for attr in ("model_dump", "to_dict", "dict"):
            f = getattr(obj, attr, None)
            if callable(f):
                d = f()
                break
        else:
            d = dict(obj)
        d.setdefault("job_id", getattr(obj, "job_id", None) or getattr(obj, "id", None))
        return d

    class SDKJobs:
        def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
            spec = dict(spec)
            src = spec.get("init_from")
            if isinstance(src, dict):  # the SDK takes "name" or ("name", version)
                spec["init_from"] = (src["name"], src["version"]) if "version" in src else src["name"]
            return as_dict(client.prefixes.train(**spec))

        def get(self, job_id: str) -> dict[str, Any]:
            jobs = client.prefixes
            getter = getattr(jobs, "get_job", None) or getattr(jobs, "job", None)
            if getter is None:
                raise AttributeError("SDK has no job getter")
            return as_dict(getter(job_id))

    return SDKJobs()


# ------------------------------------------------------------------------------------------------ store tools
def _on_store(
    url: str,
    op: Callable[[Any], Any],
    failure: str,
    catch: type[Exception] | None = None,
    *,
    existing: bool = False,
) -> Any:
    """`op(store)` on the store at `url` (closed afterwards); None after printing `failure` and the error.
    `existing`: the command only reads or removes, so a file store that does not exist is an error (opening it
    would create it, and an empty listing of a mistyped path looks like success)."""
    from prefix_store import errors, open_store

    caught = catch or errors.StoreError
    try:
        if existing and _no_store_at(url, failure):
            return None
        store = open_store(url)
    except ValueError as e:  # not a store URL
        print(f"prefixserve: {failure}{e}", file=sys.stderr)
        return None
    try:
        return op(store)
    except caught as e:
        print(f"prefixserve: {failure}{e}", file=sys.stderr)
        return None
    finally:
        store.close()


def _no_store_at(url: str, failure: str) -> bool:
    """Print why, if `url` is a file store that does not exist (opening it would create an empty one, and reading
    or copying from that looks like success). ValueError if `url` is not a store URL."""
    from prefix_store import file_store_root

    root = file_store_root(url)
    if root is not None and not root.is_dir():
        print(f"prefixserve: {failure}no prefix store at {root}", file=sys.stderr)
        return True
    return False


def _reserved(tenant_id: str, name: str) -> bool:
    """Print why, if a stored prefix may not have this tenant id or name (invalid or reserved: what the API and
    the store refuse too), before anything slow (a model load) is done."""
    from prefix_store.errors import InvalidName
    from prefix_store.names import reserved, validate_name

    try:
        validate_name(tenant_id, "tenant_id")
        validate_name(name, "name")
    except InvalidName as e:
        print(f"prefixserve: {e}", file=sys.stderr)
        return True
    problem = reserved(tenant_id, name)
    if problem is not None:
        print(f"prefixserve: {problem[1]}", file=sys.stderr)
    return problem is not None


def _one_off_settings(ns: argparse.Namespace) -> Settings | int:
    """The settings of a one-off command that loads the model (`--model`/`--device`/`--dtype`/`--cache`/`--store`
    or their PREFIXSERVE_* variables; fp32 on the CPU by default: a job beside a server that holds the GPU), with
    `ns.store` set from them; an exit code after printing why if they are invalid."""
    if ns.device is None and not env_get("PREFIXSERVE_DEVICE"):
        ns.device = "cpu"
    try:
        st = env_settings(ns, {k: v for k, v in WORKER_SETTINGS.items() if not k.startswith(("log", "jobs"))})
    except ValueError as e:
        return invalid_settings(e)
    ns.store = st.store_url
    return st


def _load_bundle(ns: argparse.Namespace, settings: Settings | None = None) -> Any:
    """The base model of `_one_off_settings` (`settings`, or read now); an exit code after printing why if the
    settings are invalid or the model does not load."""
    from server.model import load_model

    st = _one_off_settings(ns) if settings is None else settings
    if isinstance(st, int):
        return st
    try:
        return load_model(st.model, device=st.device, dtype=st.dtype, cache_dir=st.cache)
    except Exception as e:
        print(f"prefixserve: cannot load model {st.model!r}: {e}", file=sys.stderr)
        return EXIT_FAIL


def cmd_import_peft(ns: argparse.Namespace) -> int:
    from prefix_store.errors import StoreError
    from server.prefixes import import_peft
    from server.prefixes.peft_import import read_peft_config

    if _reserved(ns.tenant_id, ns.name):
        return EXIT_USAGE
    try:  # before the model loads: a wrong folder is said at once
        read_peft_config(ns.adapter_dir)
    except (OSError, StoreError) as e:
        print(f"prefixserve: import failed: {e}", file=sys.stderr)
        return EXIT_FAIL
    bundle = _load_bundle(ns)
    if isinstance(bundle, int):
        return bundle
    meta = _on_store(
        ns.store,
        lambda s: import_peft(ns.adapter_dir, bundle, s, ns.tenant_id, ns.name),
        "import failed: ",
        Exception,
    )
    if meta is None:
        return EXIT_FAIL
    print(json.dumps(meta.to_dict(), default=str))
    return EXIT_OK


def cmd_prefixes_list(ns: argparse.Namespace) -> int:
    def listing(store: Any) -> Any:
        store.ping()  # an unusable store is an error, not an empty list
        return store.list(ns.tenant_id)

    metas = _on_store(ns.store, listing, "", existing=True)
    if metas is None:
        return EXIT_FAIL
    if ns.json:
        print(json.dumps([m.to_dict() for m in metas], default=str))
        return EXIT_OK
    rows = [("TENANT", "NAME", "VERSION", "KIND", "P", "CREATED")]
    for m in metas:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created))
        rows.append((m.tenant_id, m.name, str(m.version), m.kind, str(m.prefix_length), created))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_prefixes_export(ns: argparse.Namespace) -> int:
    from prefix_store.export import export_prefix

    rec = _on_store(ns.store, lambda s: s.get(ns.tenant_id, ns.name, ns.version), "", existing=True)
    if rec is None:
        return EXIT_FAIL
    out = Path(ns.output)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(export_prefix(rec))
        os.replace(tmp, out)
    except OSError as e:
        print(f"prefixserve: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps({"file": str(out), **rec.meta.to_dict()}, default=str))
    return EXIT_OK


def cmd_prefixes_import(ns: argparse.Namespace) -> int:
    from prefix_store import errors
    from prefix_store.export import read_export
    from server.prefixes.transfer import portable

    if _reserved(ns.tenant_id, ns.name):
        return EXIT_USAGE
    try:
        incoming = portable(read_export(Path(ns.file).read_bytes()), ns.prompt_format)
    # (RecursionError: metadata JSON nested past Python's stack)
    except (OSError, RecursionError, errors.StoreError) as e:
        print(f"prefixserve: cannot import {ns.file}: {e}", file=sys.stderr)
        return EXIT_FAIL
    meta = _on_store(ns.store, lambda s: incoming.put(s, ns.tenant_id, ns.name), "import failed: ")
    if meta is None:
        return EXIT_FAIL
    print(json.dumps(meta.to_dict(), default=str))
    return EXIT_OK


def cmd_prefixes_delete(ns: argparse.Namespace) -> int:
    what = f"{ns.tenant_id}/{ns.name}" + (
        f" version {ns.version}" if ns.version is not None else " (all versions)"
    )
    if (
        _on_store(
            ns.store,
            lambda s: s.delete(ns.tenant_id, ns.name, ns.version) or True,
            "delete failed: ",
            existing=True,
        )
        is None
    ):
        return EXIT_FAIL
    print(f"deleted {what}")
    return EXIT_OK


def cmd_prefixes_copy(ns: argparse.Namespace) -> int:
    """Every version of every prefix (of one tenant, or of one name) from one store to another, each with its
    version number and creation time (a pinned `acme/support@5` names the same prefix after a move from a file
    store to Redis), and each name's version counter (a number deleted at the source is not reused at the target).
    A version the target has with the same bytes is skipped, so a copy cut short can be run
    again; one it has with other bytes, or a number below the target's highest for that name, is reported and
    the copy goes on (exit 1 at the end)."""
    from prefix_store import errors, open_store

    try:
        if _no_store_at(ns.source, "copy failed: "):
            return EXIT_FAIL
        src, dst = open_store(ns.source), open_store(ns.target)
    except ValueError as e:
        print(f"prefixserve: copy failed: {e}", file=sys.stderr)
        return EXIT_USAGE
    done = {"copied": 0, "already_there": 0, "pruned": 0, "failed": 0}
    try:
        src.ping()
        dst.ping()
        # every name, also one whose latest metadata is unreadable (a listing skips it: its good versions go too)
        names = [(t, n) for t, n in src.names(ns.tenant_id) if ns.name in (None, n)]
        if ns.name is not None and not names:
            print(f"prefixserve: copy failed: no prefix named {ns.name!r} in {ns.source}", file=sys.stderr)
            return EXIT_FAIL
        for t, n in names:
            have = set(dst.versions(t, n))
            for v in src.versions(t, n):
                if dst.keep_versions is not None and have and v < min(have):
                    done["pruned"] += 1  # older than what the target keeps: it would prune it again at once
                    continue
                try:
                    rec = src.get(t, n, v)
                except errors.PrefixNotFound:  # deleted meanwhile
                    continue
                except (
                    errors.InvalidPrefix,
                    errors.ChecksumMismatch,
                ) as e:  # this one only: the copy goes on
                    print(f"prefixserve: '{t}/{n}' v{v} not copied: {e}", file=sys.stderr)
                    done["failed"] += 1
                    continue
                m = rec.meta
                if v in have and dst.get_meta(t, n, v).sha256 == m.sha256:
                    done["already_there"] += 1
                    continue
                try:
                    if v in have:
                        raise errors.VersionTaken(f"the target holds another {m.label}")
                    dst.put(t, n, m.kind, rec.tensors, base_model_fingerprint=m.base_model_fingerprint,
                            prefix_length=m.prefix_length, training=m.training, extra=m.extra, version=v,
                            created=m.created)  # fmt: skip
                except errors.VersionTaken as e:
                    print(
                        f"prefixserve: {m.label} not copied (the target was written to): {e}", file=sys.stderr
                    )
                    done["failed"] += 1
                    continue
                done["copied"] += 1
        # the numbers the source's names have had, deleted ones too (a name deleted whole included), are not given
        # out again at the target
        for t, n in src.counted_names(ns.tenant_id):
            if ns.name in (None, n):
                dst.reserve_versions(t, n, src.version_counter(t, n))
    except errors.StoreError as e:
        print(f"prefixserve: copy failed: {e}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        src.close()
        dst.close()
    print(json.dumps(done))
    return EXIT_FAIL if done["failed"] else EXIT_OK


def cmd_prefixes_adopt(ns: argparse.Namespace) -> int:
    """Store prefixes made on the base model with the `--from-fingerprint` again for this `--model` (see
    server/prefixes/adopt.py): each name's newest old version, where the name has no newer one for this model.
    Prints one JSON object: what was (or, `--dry-run`, would be) adopted, as which version."""
    from server.prefixes import adopt

    try:
        adopt.check_abbreviation(ns.from_fingerprint)
    except ValueError as e:
        print(f"prefixserve: {e}", file=sys.stderr)
        return EXIT_USAGE
    st = _one_off_settings(ns)
    if isinstance(st, int):
        return st
    try:  # before the model loads: a missing store is said at once
        if _no_store_at(ns.store, "adopt failed: "):
            return EXIT_FAIL
    except ValueError as e:
        return invalid_settings(e)
    bundle = _load_bundle(ns, st)
    if isinstance(bundle, int):
        return bundle

    def run(store: Any) -> dict[str, Any] | int:
        store.ping()
        try:
            todo = adopt.plan(store, ns.from_fingerprint, bundle.fingerprint, ns.tenant_id, ns.name)
        except ValueError as e:  # an ambiguous abbreviation, this model's own
            print(f"prefixserve: {e}", file=sys.stderr)
            return EXIT_USAGE
        if not todo.fingerprints:  # (a typo: nothing to do is not a success)
            print(
                f"prefixserve: no stored version was made for a fingerprint starting with {ns.from_fingerprint!r} "
                "(the start-up warning, a prefix_incompatible error and `prefixes list --json` show them)",
                file=sys.stderr,
            )
            return EXIT_FAIL
        out: dict[str, Any] = {
            "fingerprint": bundle.fingerprint,
            "from_fingerprint": next(iter(todo.fingerprints), None),
            "already_current": todo.current,
            "adopted": [],
            "failed": [],
        }
        for a in todo.adopt:
            if ns.dry_run:
                out["adopted"].append(a.to_dict())
                continue
            try:
                meta = adopt.adopt_one(store, a, bundle)
            except adopt.ADOPT_ERRORS as e:
                print(f"prefixserve: {adopt.describe(a)} not adopted: {e}", file=sys.stderr)
                out["failed"].append({**a.to_dict(), "error": str(e)})
                continue
            out["adopted"].append({**a.to_dict(), "version": meta.version})
        return out

    res = _on_store(ns.store, run, "adopt failed: ", existing=True)
    if res is None:
        return EXIT_FAIL
    if isinstance(res, int):
        return res
    print(json.dumps({"dry_run": ns.dry_run, **res}))
    return EXIT_FAIL if res["failed"] else EXIT_OK


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefixserve", description="Multi-tenant LLM inference with trained prefixes"
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser(
        "serve",
        allow_abbrev=False,
        help="run the HTTP server (settings: flags > PREFIXSERVE_* env > defaults)",
    )
    _add_settings_flags(sp)
    sp.set_defaults(func=cmd_serve)

    bp = sub.add_parser(
        "run-batch",
        allow_abbrev=False,
        help="run an OpenAI Batch API JSONL file through the server in-process (vLLM's run-batch); settings as serve",
    )
    bp.add_argument(
        "-i",
        "--input-file",
        required=True,
        help="JSONL requests ('-': stdin); with API keys configured, they carry PREFIXSERVE_API_KEY (else the admin key)",
    )
    bp.add_argument("-o", "--output-file", required=True, help="JSONL results, in input order ('-': stdout)")
    bp.add_argument(
        "--max-concurrency", type=int, default=None, help="requests in flight at once (default: max_num_seqs)"
    )
    _add_settings_flags(bp, skip=LISTEN_FIELDS)
    bp.set_defaults(func=cmd_run_batch)

    wp = sub.add_parser(
        "worker",
        help="run a training worker that takes jobs from the job queue (flags > PREFIXSERVE_* env > defaults)",
    )
    wp.add_argument(
        "--store",
        default=None,
        help="prefix store URL, where trained prefixes go [env PREFIXSERVE_STORE_URL]",
    )
    wp.add_argument("--model", default=None, help="base model, the server's [env PREFIXSERVE_MODEL; smollm2]")
    wp.add_argument(
        "--jobs-url", default=None, help="job queue URL [env PREFIXSERVE_JOBS_URL; next to the store]"
    )
    wp.add_argument("--device", default=None, help="[env PREFIXSERVE_DEVICE; auto]")
    wp.add_argument("--dtype", default=None, help="[env PREFIXSERVE_DTYPE; auto]")
    wp.add_argument("--cache", default=None, help="model conversion cache folder [env PREFIXSERVE_CACHE]")
    wp.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads a job trains with (default: every core; a worker process exists to train)",
    )
    wp.add_argument(
        "--jobs-retention-s",
        type=float,
        default=None,
        help="how long a job this worker ends is kept [env PREFIXSERVE_JOBS_RETENTION_S; 7 days]",
    )
    wp.add_argument(
        "--log-level",
        default=None,
        type=str.lower,
        choices=LOG_LEVELS,
        help="[env PREFIXSERVE_LOG_LEVEL; info]",
    )
    wp.add_argument(
        "--log-json",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="JSON log lines [env PREFIXSERVE_LOG_JSON; on]",
    )
    wp.set_defaults(func=cmd_worker)

    tp = sub.add_parser("train", help="submit a training job to a running server and wait for it")
    tp.add_argument("--tenant-id", default=None, help="default: the API key's tenant (as POST /prefixes)")
    tp.add_argument("--name", required=True, help="prefix name")
    tp.add_argument("--method", default=None, help="prefix_tuning, prefix_propagation or prompt_tuning")
    tp.add_argument(
        "--data", required=True, help='JSONL examples: {"prompt": ..., "completion": ...} per line'
    )
    for flag, typ, _fld, text in TRAIN_OPTIONS:
        tp.add_argument(flag, type=typ, default=None, help=text)
    tp.add_argument(
        "--init-from", default=None, metavar="NAME[@VERSION]", help="continue training from a stored prefix"
    )
    tp.add_argument("--base-url", default=None, help="server URL [env PREFIXSERVE_BASE_URL]")
    tp.add_argument("--api-key", default=None, help="tenant key [env PREFIXSERVE_API_KEY]")
    tp.add_argument(
        "--cacert", default=None, metavar="FILE", help="HTTPS: trust the CA certificates in FILE (PEM)"
    )
    tp.add_argument(
        "--cert",
        default=None,
        metavar="FILE",
        help="HTTPS: present this client certificate (PEM; with its key unless --key), for a server that asks "
        "for one (--ssl-cert-reqs)",
    )
    tp.add_argument("--key", default=None, metavar="FILE", help="HTTPS: the private key of --cert (PEM)")
    tp.add_argument("--no-wait", action="store_true", help="print the job and return at once")
    tp.add_argument("--poll-interval", type=_positive_float, default=1.0, help="seconds between polls (1)")
    tp.add_argument(
        "--give-up-after",
        type=_non_negative_float,
        default=600.0,
        metavar="SECONDS",
        help="stop waiting (exit 1; the job goes on) once the server has not answered for this long (600; 0: never)",
    )
    tp.add_argument("--quiet", action="store_true", help="no progress bar")
    tp.set_defaults(func=cmd_train)

    ip = sub.add_parser(
        "import-peft", help="import a PEFT prefix-tuning / prompt-tuning adapter into the store"
    )
    ip.add_argument("adapter_dir", type=Path)
    ip.add_argument("--tenant-id", required=True)
    ip.add_argument("--name", required=True)
    ip.add_argument("--model", default=None, help="[env PREFIXSERVE_MODEL; smollm2]")
    ip.add_argument("--store", default=None, help="store URL [env PREFIXSERVE_STORE_URL]")
    ip.add_argument("--device", default=None, help="[env PREFIXSERVE_DEVICE; cpu]")
    ip.add_argument("--dtype", default=None, help="[env PREFIXSERVE_DTYPE; auto]")
    ip.add_argument("--cache", default=None, help="[env PREFIXSERVE_CACHE]")
    ip.set_defaults(func=cmd_import_peft)

    pp = sub.add_parser("prefixes", help="inspect the prefix store directly")
    psub = pp.add_subparsers(dest="prefixes_command", required=True)
    lp = psub.add_parser("list", help="latest version of every prefix")
    lp.add_argument("--tenant-id", default=None)
    lp.add_argument("--store", default=None, help="store URL [env PREFIXSERVE_STORE_URL]")
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=cmd_prefixes_list)
    ep = psub.add_parser("export", help="write one version of a prefix to a file (upload it to any server)")
    ep.add_argument("tenant_id")
    ep.add_argument("name")
    ep.add_argument("--version", type=int, default=None, help="default: the latest")
    ep.add_argument("-o", "--output", required=True, help="file to write (a safetensors file)")
    ep.add_argument("--store", default=None, help="store URL [env PREFIXSERVE_STORE_URL]")
    ep.set_defaults(func=cmd_prefixes_export)
    mp = psub.add_parser(
        "import", help="store an exported prefix as a new version (kept for the base model it was made on)"
    )
    mp.add_argument("file")
    mp.add_argument("--tenant-id", required=True)
    mp.add_argument("--name", required=True)
    mp.add_argument(
        "--prompt-format", choices=("chat", "raw"), default=None, help="default: the export's own"
    )
    mp.add_argument("--store", default=None, help="store URL [env PREFIXSERVE_STORE_URL]")
    mp.set_defaults(func=cmd_prefixes_import)
    dp = psub.add_parser(
        "delete", help="delete a prefix (every version), or one version (deleting the latest rolls back)"
    )
    dp.add_argument("tenant_id")
    dp.add_argument("name")
    dp.add_argument("--version", type=int, default=None, help="only this version")
    dp.add_argument("--store", default=None, help="store URL [env PREFIXSERVE_STORE_URL]")
    dp.set_defaults(func=cmd_prefixes_delete)
    cp = psub.add_parser(
        "copy",
        help="copy every version of every prefix (or one tenant's, one name's) to another store, keeping version "
        "numbers and creation times (file store -> Redis, say); run it again to finish a copy cut short",
    )
    cp.add_argument("--from", dest="source", required=True, help="the store URL to copy from")
    cp.add_argument("--to", dest="target", required=True, help="the store URL to copy to")
    cp.add_argument("--tenant-id", default=None, help="only this tenant's prefixes")
    cp.add_argument("--name", default=None, help="only prefixes of this name")
    cp.set_defaults(func=cmd_prefixes_copy)
    ap = psub.add_parser(
        "adopt",
        help="store prefixes made on another base-model fingerprint again for this model, as new versions: for when "
        "only the fingerprint moved (a transformers upgrade, a config.json edit the model never reads, the embedded "
        "model converted again); the weights must be the same",
    )
    ap.add_argument(
        "--from-fingerprint",
        required=True,
        metavar="HEX",
        help="the old model's fingerprint, or its first 12+ hex digits (GET /info of the old server, "
        "`prefixes list --json`, a prefix_incompatible error)",
    )
    ap.add_argument("--tenant-id", default=None, help="only this tenant's prefixes")
    ap.add_argument("--name", default=None, help="only prefixes of this name")
    ap.add_argument("--dry-run", action="store_true", help="say what would be adopted, store nothing")
    ap.add_argument("--model", default=None, help="this model [env PREFIXSERVE_MODEL; smollm2]")
    ap.add_argument("--store", default=None, help="store URL [env PREFIXSERVE_STORE_URL]")
    ap.add_argument("--device", default=None, help="[env PREFIXSERVE_DEVICE; cpu]")
    ap.add_argument("--dtype", default=None, help="[env PREFIXSERVE_DTYPE; auto]")
    ap.add_argument("--cache", default=None, help="[env PREFIXSERVE_CACHE]")
    ap.set_defaults(func=cmd_prefixes_adopt)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "store", "x") is None and ns.command == "prefixes":
        try:
            ns.store = env_settings(ns, {"store_url": "store"}).store_url
        except ValueError as e:
            return invalid_settings(e)
    return int(ns.func(ns) or 0)


def end_process(rc: int) -> typing.NoReturn:
    """End the process with `rc` once a command is done, its logs and output flushed, without the interpreter's
    teardown: a server that drained and shut down cleanly still has daemon threads (tokenizer and loader pools,
    torch's own) that the teardown can catch inside native code, and it aborted ("terminate called without an
    active exception", SIGABRT) about once in twenty exits under load, so a clean drain reported -6 to its
    supervisor. Nothing is left to run at that point: the lifespan closed the store, the engine and the jobs."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(rc)


def console() -> typing.NoReturn:
    """The entry point of `prefixserve` scripts installed before it moved to `server.console` (pip's scripts
    import what pyproject.toml named when they were installed)."""
    from server.console import console as run

    run()


if __name__ == "__main__":  # pragma: no cover
    end_process(main())
