"""Concurrent calls that one Ctrl-C stops: served teachers send batches this way, and the router scores its
teachers' groups this way, so both share one implementation of the daemon-thread pool."""

from __future__ import annotations

import threading


def map_concurrently(function, items: list, workers: int) -> list:
    """[function(item) for item in items] on at most `workers` daemon threads; the first error (in item order)
    is raised. Unlike ThreadPoolExecutor, neither a Ctrl-C here nor the interpreter's exit waits for threads
    still blocked on a server: one Ctrl-C stops the run."""
    results, errors, lock = [None] * len(items), {}, threading.Lock()
    pending = iter(range(len(items)))

    def work():
        while True:
            with lock:
                index = next(pending, None)
            if index is None or errors:
                return
            try:
                results[index] = function(items[index])
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                errors[index] = error

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.1)  # short waits: a Ctrl-C lands between them even where join would not wake
    if errors:
        raise errors[min(errors)]
    return results
