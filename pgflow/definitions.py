"""``@pgflow.workflow`` and ``@pgflow.step``, and the registry of workflows.

A decorated workflow stays callable as a plain function; a decorated step is
checkpointed when called inside a running workflow and is a plain call
anywhere else, so both can be unit-tested without a database.

Inside a workflow a step call goes to the engine (:mod:`pgflow.replay`) of the
workflow that :func:`pgflow.steps.current` finds running; the argument checks
are :mod:`pgflow.validation`'s.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, overload

from pgflow import codec, steps
from pgflow.flow import Concurrency, key_text
from pgflow.retry import Retry
from pgflow.validation import check_name, check_retry, check_timeout

__all__ = ["Step", "Workflow", "registered_workflows", "step", "workflow"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_QUEUE = "default"
DEFAULT_VERSION = "1"

_registry: dict[tuple[str, str], Workflow] = {}
# Steps by name, for ctx.map: each item of a map is a run of an internal
# workflow "pgflow.map:<step>" that any worker with the step's code can claim.
_steps: dict[str, Step | None] = {}  # None: two different steps share the name
RESERVED_PREFIX = "pgflow."  # internal workflows; pgflow.start refuses these names too
MAP_PREFIX = RESERVED_PREFIX + "map:"
MAP_VERSION = "map"


class Workflow:
    """A workflow definition: ``fn(ctx, *inputs)`` plus its name, version and queue."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None, version: str, queue: str,
                 retry: Retry | None, timeout: timedelta | float | None,
                 concurrency: Concurrency | None = None) -> None:
        self.fn = fn
        self.name = check_name(name or fn.__name__, "workflow name")
        self.version = check_name(version, "workflow version")
        self.queue = check_name(queue, "workflow queue")
        self.retry = check_retry(retry)
        self.timeout = check_timeout(timeout)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = codec.Signature(fn, skip_first=True)
        self.concurrency = self._check_concurrency(concurrency)
        functools.update_wrapper(self, fn)

    def _check_concurrency(self, concurrency: object) -> Concurrency | None:
        if concurrency is None:
            return None
        if not isinstance(concurrency, Concurrency):
            raise TypeError(f"concurrency of workflow {self.name!r} must be a "
                            f"pgflow.Concurrency, not {concurrency!r}")
        if concurrency.key is not None:
            named = [p.name for p in self.signature.parameters
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if concurrency.key not in named:
                raise ValueError(
                    f"Concurrency key {concurrency.key!r} of workflow {self.name!r} is not one "
                    f"of its parameters ({', '.join(named) or 'it has none'})")
        return concurrency

    def concurrency_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The key of a run started with these arguments, defaults applied (None: no key)."""
        if self.concurrency is None or self.concurrency.key is None:
            return None
        bound = self.signature.signature.bind_partial(*args, **kwargs)
        bound.apply_defaults()
        if self.concurrency.key not in bound.arguments:
            return None
        value = codec.to_json(bound.arguments[self.concurrency.key],
                              f"the concurrency key of workflow {self.name!r}")
        return key_text(value)

    def announcement(self) -> dict[str, Any]:
        """What a worker that serves it tells ``pgflow.register_worker`` about it."""
        return {"name": self.name, "version": self.version, "queue": self.queue,
                "timeout_seconds": self.timeout.total_seconds() if self.timeout else None,
                "params": self.signature.describe(),
                "concurrency": self.concurrency.announced() if self.concurrency else None}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<pgflow.Workflow {self.name} v{self.version} queue={self.queue}>"


class Step:
    """A step definition; calling it inside a running workflow checkpoints it."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None, retry: Retry | None,
                 timeout: timedelta | float | None, queue: str | None,
                 transactional: bool = False) -> None:
        self.fn = fn
        self.name = check_name(name or fn.__name__, "step name")
        self.retry = check_retry(retry)
        self.timeout = check_timeout(timeout)
        self.queue = None if queue is None else check_name(queue, "step queue")
        self.is_async = inspect.iscoroutinefunction(fn)
        if not isinstance(transactional, bool):
            raise TypeError(f"transactional must be True or False, not {transactional!r}")
        self.transactional = transactional
        if transactional:
            _check_takes_connection(fn, self.name)
            if timeout is not None:
                raise ValueError(f"transactional step {self.name!r} cannot have a timeout: its "
                                 "transaction would outlive the attempt (use the database's "
                                 "statement_timeout inside the step)")
        # A transactional step's first parameter is the worker's connection, not an input.
        self.signature = codec.Signature(fn, skip_first=transactional)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = steps.current()
        if ctx is None:
            return self.fn(*args, **kwargs)
        return ctx._call_step(self, self.name, args, kwargs)

    def __repr__(self) -> str:
        return f"<pgflow.Step {self.name}>"


def _check_takes_connection(fn: Callable[..., Any], name: str) -> None:
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"transactional step {name!r} must take the connection as its first "
                        "positional parameter: def step(conn, ...)")


@overload
def workflow(fn: F, /) -> Workflow: ...
@overload
def workflow(*, name: str | None = None, version: str = DEFAULT_VERSION, queue: str = DEFAULT_QUEUE,
             retry: Retry | None = None, timeout: timedelta | float | None = None,
             concurrency: Concurrency | None = None) -> Callable[[F], Workflow]: ...
def workflow(fn: Any = None, /, *, name: str | None = None, version: str = DEFAULT_VERSION,
             queue: str = DEFAULT_QUEUE, retry: Retry | None = None,
             timeout: timedelta | float | None = None,
             concurrency: Concurrency | None = None) -> Any:
    """Declare a workflow: ``fn(ctx, *inputs)``, ``def`` or ``async def``.

    Registers it under ``(name, version)`` for workers started in this process.
    ``concurrency`` (:class:`pgflow.Concurrency`) caps its executing runs.
    """

    def decorate(f: Callable[..., Any]) -> Workflow:
        wf = Workflow(f, name=name, version=version, queue=queue, retry=retry, timeout=timeout,
                      concurrency=concurrency)
        if wf.name.startswith(RESERVED_PREFIX):
            raise ValueError(f"workflow name {wf.name!r} is reserved: names beginning with "
                             f"{RESERVED_PREFIX!r} belong to pgflow's internal workflows")
        _register(wf)
        return wf

    return decorate(fn) if fn is not None else decorate


@overload
def step(fn: F, /) -> Step: ...
@overload
def step(*, name: str | None = None, retry: Retry | None = None,
         timeout: timedelta | float | None = None, queue: str | None = None,
         transactional: bool = False) -> Callable[[F], Step]: ...
def step(fn: Any = None, /, *, name: str | None = None, retry: Retry | None = None,
         timeout: timedelta | float | None = None, queue: str | None = None,
         transactional: bool = False) -> Any:
    """Declare a step: its result is checkpointed when called inside a workflow.

    ``transactional=True``: the step takes, as its first parameter, the worker's
    connection inside the transaction that writes its checkpoint (psycopg
    ``Connection``, ``AsyncConnection`` for ``async def``); its writes and its
    checkpoint commit together or not at all. Inside a workflow it is called
    without that argument; outside one, pass a connection yourself.
    """

    def decorate(f: Callable[..., Any]) -> Step:
        defined = Step(f, name=name, retry=retry, timeout=timeout, queue=queue,
                       transactional=transactional)
        _register_step(defined)
        return defined

    return decorate(fn) if fn is not None else decorate


def _register(wf: Workflow) -> None:
    key = (wf.name, wf.version)
    existing = _registry.get(key)
    same_code = existing is not None and (
        existing.fn.__module__, existing.fn.__qualname__) == (wf.fn.__module__, wf.fn.__qualname__)
    if existing is not None and not same_code:
        raise ValueError(f"workflow {wf.name!r} version {wf.version!r} is defined twice: "
                         f"{existing.fn.__module__}.{existing.fn.__qualname__} and "
                         f"{wf.fn.__module__}.{wf.fn.__qualname__}")
    _registry[key] = wf


def _register_step(defined: Step) -> None:
    existing = _steps.get(defined.name, defined)
    same = existing is not None and (existing.fn.__module__, existing.fn.__qualname__) == (
        defined.fn.__module__, defined.fn.__qualname__)
    _steps[defined.name] = defined if same else None


def registered_workflows() -> list[Workflow]:
    """Every workflow declared in this process so far."""
    return list(_registry.values())


def map_workflows() -> list[Workflow]:
    """The internal workflows that run ctx.map items, one per uniquely named step."""
    return [map_workflow(s) for s in _steps.values() if s is not None]


_map_workflows: dict[str, Workflow] = {}


def map_workflow(defined: Step) -> Workflow:
    """The internal workflow that runs one ctx.map item of ``defined``."""
    if _steps.get(defined.name) is not defined:
        raise ValueError(f"ctx.map needs a step with a unique name: {defined.name!r} names "
                         "several steps (give them name=...)")
    found = _map_workflows.get(defined.name)
    if found is None:
        found = Workflow(_map_item_runner(defined), name=MAP_PREFIX + defined.name,
                         version=MAP_VERSION, queue=defined.queue or DEFAULT_QUEUE, retry=None,
                         timeout=None)
        _map_workflows[defined.name] = found
    return found


def _map_item_runner(defined: Step) -> Callable[..., Any]:
    """A workflow body running the step once for one item, typed by the step's hints."""

    def decode(args: tuple[Any, ...]) -> tuple[list[Any], dict[str, Any]]:
        return defined.signature.decode_args(list(args), f"an item of ctx.map({defined.name})")

    if defined.is_async:
        async def run_item_async(ctx: Any, *args: Any) -> Any:
            positional, named = decode(args)
            return await ctx._call_step(defined, defined.name, tuple(positional), named)
        return run_item_async

    def run_item(ctx: Any, *args: Any) -> Any:
        positional, named = decode(args)
        return ctx._call_step(defined, defined.name, tuple(positional), named)
    return run_item


def lookup(name: str, version: str) -> Workflow | None:
    return _registry.get((name, version))
