"""One call, several generations (``n``, a list of prompts): all of them, or none left running; and none left
running for a client that went away."""

from __future__ import annotations

import asyncio


async def cancel(tasks) -> None:
    """Cancel what is still running of ``tasks`` and wait until it has stopped."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def gather(awaitables) -> list:
    """Await every one; when one fails (or this call is cancelled), cancel the others and wait for them before
    raising, so that no sibling keeps running (and holding KV blocks) for a call that has already failed."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        await cancel(tasks)
        raise


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready (its generations were stopped)."""


async def while_connected(request, awaitable, poll_s: float = 0.25):
    """``await awaitable`` unless the client of ``request`` (a Starlette request whose body was read) disconnects
    first: then cancel it (its generations stop in the engine) and raise ``ClientGone``. A unary HTTP handler
    otherwise runs to its end for nobody."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    except BaseException:
        await cancel([task])
        raise
