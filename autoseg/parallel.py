"""One way to run a function over many items in worker processes, with a progress bar."""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def map_with_progress(function: Callable[[T], R], items: Iterable[T], num_processes: int, description: str,
                      progress: bool = True) -> list[R]:
    """``[function(item) for item in items]`` in order, over ``num_processes`` processes.

    Workers are forked where the platform allows (cheap start, no re-import of torch) and
    each is limited to one thread, so that ``-np 2`` uses two cores and not 2 x N.
    """
    items = list(items)
    show = progress and sys.stderr.isatty() or progress == "always"
    bar = tqdm(total=len(items), desc=description, disable=not show, unit="case", leave=False)
    if num_processes <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(function(item))
            bar.update()
        bar.close()
        return results
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
    context = multiprocessing.get_context(method)
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies (killed, out of
    # memory) it raises BrokenProcessPool instead of waiting forever.
    chunksize = max(1, min(8, len(items) // (4 * num_processes)))
    with ProcessPoolExecutor(num_processes, mp_context=context, initializer=_single_thread) as pool:
        results = []
        for result in pool.map(function, items, chunksize=chunksize):
            results.append(result)
            bar.update()
    bar.close()
    return results


def _single_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    # Only where torch is loaded already: importing it here would cost every worker seconds,
    # and a worker that imports it later reads OMP_NUM_THREADS above.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
