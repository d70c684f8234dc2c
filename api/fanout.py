"""One call, several generations (``n``, a list of prompts): all of them, or none left running."""

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
