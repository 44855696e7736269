"""Decoding beside denoising: a decoder's stream runs in a worker thread (on CUDA, on a stream of its own), so the VAE
decodes chunk i while the DiT denoises chunk i+1 (the pipeline's decode order "overlapped").

On one GPU both are compute-heavy, so the gain is whatever idle capacity each leaves the other (the VAE's convs ran
at 18% of the H100's matmul rate); the DiT's caches and the decode share memory, as in the "interleaved" order.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import nullcontext
from typing import Iterator

import torch

_END = object()


class DecodeBeside:
    """Feed latent chunks with :meth:`put` from the caller's thread; collect (frames, decode seconds) in order with
    :meth:`results`. An error in the worker is raised from :meth:`results`; :meth:`close` ends the worker after the
    chunks already handed over."""

    def __init__(self, decoder, device: torch.device) -> None:
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._arrived = 0.0
        self._thread = threading.Thread(target=self._run, args=(decoder,), name="histream-decode", daemon=True)
        self._thread.start()

    def put(self, latents: torch.Tensor) -> None:
        """Hand over a chunk's latents, made on the caller's (current) CUDA stream."""
        ready = None
        if self.side is not None:
            ready = torch.cuda.Event()
            ready.record()
            latents.record_stream(self.side)  # the allocator must not reuse them before the worker's stream is done
        self._inbox.put((latents, ready))

    def results(self, block: bool) -> Iterator[tuple[torch.Tensor, float]]:
        """The frames decoded so far; with ``block``, all of them until the worker ends (after :meth:`close`)."""
        while True:
            try:
                item = self._outbox.get(block=block)
            except queue.Empty:
                return
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if self.side is not None:
                item[0].record_stream(torch.cuda.current_stream())  # freed later here: wait for this stream's reads
            yield item

    def close(self) -> None:
        """No more chunks; waits for the worker to decode those it has and end."""
        self._inbox.put(_END)
        self._thread.join()

    def _chunks(self) -> Iterator[torch.Tensor]:
        while (item := self._inbox.get()) is not _END:
            latents, ready = item
            if ready is not None:
                self.side.wait_event(ready)
            self._arrived = time.perf_counter()
            yield latents

    def _run(self, decoder) -> None:
        try:
            with torch.cuda.stream(self.side) if self.side is not None else nullcontext():
                for frames in decoder.decode_stream(self._chunks()):
                    if self.side is not None:
                        self.side.synchronize()  # complete before another thread's stream reads them
                    self._outbox.put((frames, time.perf_counter() - self._arrived))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            self._outbox.put(exc)
        finally:
            self._outbox.put(_END)


__all__ = ["DecodeBeside"]
