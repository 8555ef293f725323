"""Dynamic micro-batching: concurrent requests share one model call.

Each image waits at most `max_wait_ms` for others to join its batch (at most `max_batch` images);
the model runs in one worker thread, so the event loop keeps accepting requests meanwhile, and
whatever queued up during a model call goes into the next batch. `max_batch=1` turns batching
off (one model call per image), for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class MicroBatcher:
    """`await submit(image)` -> the model's output row for that image."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batches = 0  # model calls so far
        self.images = 0  # images through the model so far
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, image: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._queue_for_this_loop().put_nowait((image, future))
        return await future

    def _queue_for_this_loop(self) -> asyncio.Queue:
        """Start the worker on first use in the running event loop (and again in a new one)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._work(self._queue))
        assert self._queue is not None
        return self._queue

    async def _work(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            batch = [(img, fut) for img, fut in batch if not fut.done()]  # clients gone
            if not batch:
                continue
            images = np.stack([img for img, _ in batch])
            try:
                out = await loop.run_in_executor(self._executor, self.run_batch, images)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.images += len(batch)
            for (_, fut), row in zip(batch, out, strict=True):
                if not fut.done():
                    fut.set_result(row)

    async def close(self) -> None:
        """Stop the worker (a later `submit` starts a new one)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
            self._task = None
