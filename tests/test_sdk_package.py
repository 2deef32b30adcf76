"""The SDK distribution (clients/python): light imports, its own dependencies, public API, model tolerance."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "python"
PKG = CLIENT / "prefixserve_client"
if str(CLIENT) not in sys.path:
    sys.path.insert(0, str(CLIENT))

import prefixserve_client as ps  # noqa: E402

HEAVY = ("torch", "server", "prefix_store", "transformers", "numpy", "safetensors", "fastapi", "uvicorn")


def test_fresh_import_pulls_no_server_or_torch(tmp_path: Path) -> None:
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "import prefixserve_client as p;"
        "c = p.Client('http://127.0.0.1:9'); a = p.AsyncClient('http://127.0.0.1:9');"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(CLIENT)],
        cwd=tmp_path,  # not the repo root: `server` is not importable by accident
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_sources_import_only_httpx_pydantic_and_stdlib() -> None:
    allowed = set(sys.stdlib_module_names) | {"httpx", "pydantic", "prefixserve_client"}
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_distribution_metadata() -> None:
    meta = tomllib.loads((CLIENT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert meta["name"] == "prefixserve-client"
    deps = sorted(d.split(">")[0].split("=")[0].split("<")[0].strip() for d in meta["dependencies"])
    assert deps == ["httpx", "pydantic"]
    assert meta["version"] == ps.__version__
    # an SPDX string: setuptools deprecated the `{text = ...}` table (builds stop working after 2027-02-18)
    assert meta["license"] == "Apache-2.0"
    assert (CLIENT / "README.md").is_file() and (PKG / "py.typed").is_file()


def test_public_api() -> None:
    for name in ps.__all__:
        assert hasattr(ps, name), name
    status = {
        ps.BadRequest: 400,
        ps.Unauthorized: 401,
        ps.Forbidden: 403,
        ps.NotFound: 404,
        ps.RequestTimeout: 408,
        ps.Conflict: 409,
        ps.PayloadTooLarge: 413,
        ps.UnprocessableEntity: 422,
        ps.RateLimited: 429,
        ps.ServiceUnavailable: 503,
    }
    from prefixserve_client._exceptions import error_class

    for cls, code in status.items():
        assert issubclass(cls, ps.APIStatusError) and error_class(code) is cls
    assert error_class(500) is ps.InternalServerError and error_class(504) is ps.InternalServerError
    assert issubclass(ps.APIStatusError, ps.PrefixServeError)
    assert issubclass(ps.APITimeoutError, ps.APIConnectionError)
    assert issubclass(ps.APIConnectionError, ps.PrefixServeError)
    assert issubclass(ps.APIResponseValidationError, ps.PrefixServeError)
    assert issubclass(ps.TrainingFailed, ps.TrainingError) and issubclass(
        ps.TrainingCancelled, ps.TrainingError
    )
    # the openai SDK's names, exported: the same classes
    aliases = {
        "BadRequestError": ps.BadRequest,
        "AuthenticationError": ps.Unauthorized,
        "PermissionDeniedError": ps.Forbidden,
        "NotFoundError": ps.NotFound,
        "ConflictError": ps.Conflict,
        "UnprocessableEntityError": ps.UnprocessableEntity,
        "RateLimitError": ps.RateLimited,
        "InternalServerError": ps.InternalServerError,
    }
    for name, cls in aliases.items():
        assert name in ps.__all__ and getattr(ps, name) is cls, name


def test_every_public_method_has_a_docstring_and_types_exports_every_model() -> None:
    import inspect

    from prefixserve_client import types
    from pydantic import BaseModel

    classes = (ps.Client, ps.AsyncClient, ps.Prefixes, ps.AsyncPrefixes, ps.Stream, ps.AsyncStream, ps.Job)
    missing = [
        f"{cls.__name__}.{name}"
        for cls in (*classes, ps.AsyncJob, ps.JobInfo)
        for name, obj in vars(cls).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or isinstance(obj, property))
        and not inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
    ]
    assert missing == []
    models = {
        name
        for name, obj in vars(types).items()
        if inspect.isclass(obj) and issubclass(obj, (BaseModel, list)) and obj.__module__ == types.__name__
    }
    assert {m for m in models if not m.startswith("_")} == set(types.__all__)
    assert set(types.__all__) <= set(ps.__all__)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1.0), ("0", 0.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None), (None, None), ("nan", None)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    from prefixserve_client._exceptions import parse_retry_after

    assert parse_retry_after(value) == expected


def test_models_tolerate_extra_and_missing_optional_fields() -> None:
    g = ps.Generation.model_validate(
        {
            "id": "g",
            "tenant_id": "t",
            "text": "x",
            "finish_reason": "stop",
            "new": [1],
            "usage": {"prompt_tokens": 1},
        }
    )
    assert g.model_extra == {"new": [1]} and g.usage.prompt_tokens == 1 and g.usage.total_tokens == 0
    d = ps.StreamDelta.model_validate({"text": "a", "logprobs": None})
    assert d.finish_reason is None and d.usage is None
    job = ps.Job.model_validate({"job_id": "j", "status": "running", "progress": {"step": 1, "eta_s": 3}})
    assert job.progress is not None and job.progress.model_extra == {"eta_s": 3} and not job.done
    p = ps.PrefixInfo.model_validate({"tenant_id": "t", "name": "n"})
    assert p.versions is None and p.shapes == {}


def _server_fields(path: Path, cls: str) -> set[str]:
    """The annotated fields of a class of the server's source (read, not imported: the server imports torch)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def test_typed_responses_have_every_field_the_server_sends() -> None:
    """Job and ServerInfo type what the server's replies hold (they lacked prefix_length, hyperparameters,
    cancel_requested, limits, architecture, max_batched_tokens, max_queued, ...), Optional so that an older
    server's replies still parse."""
    job_sent = _server_fields(ROOT / "server" / "training" / "records.py", "JobRecord") - {"request_digest"}
    assert {"prefix_length", "hyperparameters", "cancel_requested", "limits"} <= job_sent
    assert job_sent <= set(ps.Job.model_fields), job_sent - set(ps.Job.model_fields)
    info_sent = _server_fields(ROOT / "server" / "api" / "schemas.py", "ServerInfo")
    assert {"architecture", "max_batched_tokens", "max_queued"} <= info_sent
    assert info_sent <= set(ps.ServerInfo.model_fields), info_sent - set(ps.ServerInfo.model_fields)

    record = {
        "object": "training_job",
        "job_id": "j",
        "tenant_id": "acme",
        "name": "faq",
        "method": "prompt_tuning",
        "prefix_length": 16,
        "status": "succeeded",
        "hyperparameters": {"epochs": 3},
        "num_examples": 24,
        "limits": {"max_seconds": 3600.0, "max_steps": None},
        "attempts": 1,
        "worker": "w1",
        "heartbeat": 12.5,
        "cancel_requested": False,
        "summary": {"steps": 40, "total_steps": 96, "stopped": "time_limit"},
    }
    job = ps.Job.model_validate(record)
    assert (job.prefix_length, job.hyperparameters, job.cancel_requested) == (16, {"epochs": 3}, False)
    assert (job.limits, job.num_examples, job.attempts, job.worker) == (record["limits"], 24, 1, "w1")
    assert job.stopped == "time_limit" and job.model_extra == {}
    old = ps.Job.model_validate({"job_id": "j", "status": "running"})  # a server before these fields
    assert (old.prefix_length, old.hyperparameters, old.cancel_requested, old.limits, old.stopped) == (
        None,
    ) * 5
    info = ps.ServerInfo.model_validate(
        {"model": "m", "architecture": "LlamaForCausalLM", "max_batched_tokens": 2048, "max_queued": 256}
    )
    assert (info.architecture, info.max_batched_tokens, info.max_queued) == ("LlamaForCausalLM", 2048, 256)
    assert info.model_extra == {}
    old_info = ps.ServerInfo.model_validate({"model": "m", "max_model_len": 2048})
    assert (old_info.architecture, old_info.max_batched_tokens, old_info.max_queued) == (None, None, None)


def test_sync_and_async_methods_take_the_same_arguments() -> None:
    import inspect

    for sync_cls, async_cls in ((ps.Client, ps.AsyncClient), (ps.Prefixes, ps.AsyncPrefixes)):
        for name, obj in vars(sync_cls).items():
            if name.startswith("_") or not inspect.isfunction(obj):
                continue
            other = getattr(async_cls, name, None)
            assert other is not None, f"{async_cls.__name__}.{name}"
            params = [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]
            aparams = [(p.name, p.kind, p.default) for p in inspect.signature(other).parameters.values()]
            assert params == aparams, name


def test_readme_examples_and_claims() -> None:
    """The SDK README's examples run on a fresh server (every generate/stream/tokenize names its prefix: the default
    "default" is a 404 until trained), its structured outputs name structural_tag, and what it says a /generate body
    always carries is what generate_body sends at the defaults."""
    import inspect
    import re

    from prefixserve_client._base import generate_body

    readme = (CLIENT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        for node in ast.walk(ast.parse(block)):
            called = (
                node.func.attr if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else ""
            )
            if called in ("generate", "stream", "tokenize"):
                assert "prefix" in {k.arg for k in node.keywords}, ast.unparse(node)  # type: ignore[attr-defined]
    structured = readme[readme.index("`structured_outputs` holds") :]
    assert "structural_tag" in structured[: structured.index("```")]
    claim = re.search(r"A `/generate` body always carries (.*?);", readme, re.S)
    assert claim is not None
    always = set(re.findall(r"`(\w+)`", claim.group(1)))
    params = inspect.signature(ps.Client.generate).parameters
    defaults = {
        n: p.default
        for n, p in params.items()
        if p.kind is p.KEYWORD_ONLY and n not in ("request_id", "extra_body")
    }
    assert set(generate_body("acme", "Hi", stream=False, **defaults)) == always


def test_sse_decoder() -> None:
    from prefixserve_client._base import iter_sse_events

    lines = [": ping", "event: error", 'data: {"a":', "data: 1}", "", "", "data:[DONE]", "id: 3"]
    text = "\n".join(lines)
    want = [("error", '{"a":\n1}'), (None, "[DONE]")]
    assert list(iter_sse_events([text])) == want
    assert list(iter_sse_events(list(text))) == want  # one character a chunk
    assert list(iter_sse_events([text.replace("\n", "\r\n")])) == want
    assert list(iter_sse_events([text.replace("\n", "\r")])) == want


def test_sse_lines_end_only_at_cr_lf_or_crlf() -> None:
    """SSE ends a line at \\r\\n, \\r or \\n only: U+2028, U+2029, U+0085, \\x0b, \\x0c, \\x1c-\\x1e (which
    str.splitlines and httpx's iter_lines split at) stay in the line; a \\r\\n split between two chunks is one line
    end; a line may span chunks."""
    from prefixserve_client._base import LineSplitter, iter_sse_events

    odd = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\x1dh\x1ei"
    assert list(iter_sse_events([f"data: {odd}\n\n"])) == [(None, odd)]

    def split(chunks: list[str]) -> list[str]:
        s = LineSplitter()
        return [line for c in chunks for line in s.feed(c)] + s.flush()

    assert split(["a\r", "\nb\r\n"]) == ["a", "b"]  # not "a", "", "b"
    assert split(["a\r", "", "\nb"]) == ["a", "b"]  # (an empty chunk between them)
    assert split(["a\r", "\r\n"]) == ["a", ""]  # \r then \r\n: two line ends
    assert split(["a\r", "b\n\n"]) == ["a", "b", ""]
    assert split(["\n", "\n"]) == ["", ""]
    assert split(["da", "ta: x", "y\r\n", "\r\ntail"]) == ["data: xy", "", "tail"]
    assert split([odd, "\r"]) == [odd]


def test_py39_annotations_evaluate() -> None:
    """No annotation anywhere in the package is written `X | Y`: `typing.get_type_hints` evaluates annotations even
    when `from __future__ import annotations` defers them, and on Python 3.9 `X | None` fails there (pydantic's
    validate_call, typer, sphinx autodoc on the SDK's methods)."""
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for a in ast.walk(tree):
            if isinstance(a, ast.arg | ast.AnnAssign):
                ann = a.annotation
            elif isinstance(a, ast.FunctionDef | ast.AsyncFunctionDef):
                ann = a.returns
            else:
                continue
            if ann is None:
                continue
            texts = [
                n.value for n in ast.walk(ann) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            ]
            pep604 = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(ann))
            assert not pep604 and not any("|" in t for t in texts), (
                f"{path.name}:{a.lineno}: {ast.unparse(ann)}"
            )


def test_py39_syntax_for_runtime_annotations() -> None:
    """The distribution supports Python 3.9: pydantic models must not use `X | Y` annotations (evaluated at
    runtime), and every module with such annotations elsewhere defers them."""
    for path in PKG.rglob("*.py"):
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
        future = any(
            isinstance(n, ast.ImportFrom)
            and n.module == "__future__"
            and any(a.name == "annotations" for a in n.names)
            for n in tree.body
        )
        if path.name == "types.py":
            assert not future, "types.py: pydantic evaluates annotations; keep Optional[...] there"
            for node in ast.walk(tree):
                if isinstance(node, ast.AnnAssign):
                    assert not any(isinstance(n, ast.BinOp) for n in ast.walk(node.annotation)), ast.unparse(
                        node
                    )
        else:
            has_union = any(
                isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                for a in ast.walk(tree)
                if isinstance(a, ast.arg | ast.AnnAssign | ast.FunctionDef | ast.AsyncFunctionDef)
                for n in ast.walk(
                    (a.annotation if isinstance(a, ast.arg | ast.AnnAssign) else a.returns) or ast.Pass()
                )  # (an argument without an annotation, `self`, has None)
            )
            assert future or not has_union, path.name


def test_mypy_strict_passes_and_error_jobs_type_check_for_async_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mypy --strict` finds nothing in the package, and user code awaiting `e.job.refresh()` (an AsyncJob at
    runtime) checks (it did not while `TrainingError.job` was annotated `Job`). Needs mypy (not a dev dependency)."""
    api = pytest.importorskip("mypy.api")
    out, err, rc = api.run(["--strict", "--no-incremental", str(PKG)])
    assert rc == 0, out + err
    user = tmp_path / "user.py"
    user.write_text(
        "from prefixserve_client import AsyncClient, AsyncJob, Client, TrainingFailed, WaitTimeout\n"
        "async def a(c: AsyncClient) -> None:\n"
        "    job = await c.prefixes.get_job('j')\n"
        "    try:\n"
        "        await job.wait(timeout=1)\n"
        "    except TrainingFailed as e:\n"
        "        await e.job.refresh()\n"
        "    except WaitTimeout as w:\n"
        "        await w.job.cancel()\n"
        "def s(c: Client) -> None:\n"
        "    try:\n"
        "        c.prefixes.get_job('j').wait()\n"
        "    except TrainingFailed as e:\n"
        "        e.job.refresh()\n"
        "def precise(e: TrainingFailed[AsyncJob]) -> AsyncJob:\n"
        "    return e.job\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MYPYPATH", str(CLIENT))
    out, err, rc = api.run(["--strict", "--no-incremental", str(user)])
    assert rc == 0, out + err
