"""Run a generator in a background thread, `depth` items ahead of the consumer.

The loaders' producers (DALI runs, CPU resizes) release the GIL for most of their work, so a
thread lets them overlap the consumer's step.
"""

import queue
import threading
import time

_END = object()


def background(make_items, depth=2, name="insclr-loader", device=None):
    """Iterate `make_items()` (called in the thread) with up to `depth` items queued.

    Yields (item, wait_s): wait_s = seconds the consumer waited for the item. An exception in
    the producer is raised in the consumer. Closing the iterator stops the producer.
    """
    import torch

    out = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()
    device = None if device is None else torch.device(device)
    if device is not None and device.type == "cuda" and device.index is None:
        # torch.cuda.set_device needs an index; the thread uses the caller's current device.
        device = torch.device("cuda", torch.cuda.current_device())

    def work():
        items = None
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            items = make_items()
            for item in items:
                if stop.is_set():
                    return
                out.put(item)
            out.put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            out.put(e)
        finally:
            if items is not None:
                items.close()

    worker = threading.Thread(target=work, daemon=True, name=name)
    worker.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item, time.perf_counter() - t0
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()
