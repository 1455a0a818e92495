"""What a fresh process pays before bf16 attention runs on the CPU: the first call of the compiled score loop.

Under ``--precision bf16-mixed`` on the CPU the attention's score work is one loop compiled by ``torch.compile``
(``model.attention.compiled_probabilities``). Each process compiles it, or loads it from inductor's cache
(``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``, kept between processes). This script runs
the first and the second call on small bf16 scores in this fresh process and prints wall and CPU time, the CPU
time of child processes (inductor's compiler workers and C++ compiler), and the import of torch::

    python benchmarks/bf16_first_call.py                                     # the default cache, as a user has it
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/bf16_first_call.py  # an empty cache: compiled afresh
"""

from __future__ import annotations

import os
import resource
import time

started_wall, started_cpu = time.perf_counter(), time.process_time()
import torch  # noqa: E402

from transcriptformer.model.attention import compiled_probabilities  # noqa: E402

imported_wall, imported_cpu = time.perf_counter(), time.process_time()


def main() -> None:
    torch.set_num_threads(1)
    batch, heads, keys, start = 2, 8, 300, 100
    scores = torch.randn(batch, heads, keys - start, keys, dtype=torch.bfloat16)
    count_bias, kv_is_pad = torch.randn(batch, keys), torch.zeros(batch, keys, dtype=torch.bool)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"import torch: wall {imported_wall - started_wall:.2f} s, CPU {imported_cpu - started_cpu:.2f} s")
    for call in ("first", "second"):
        wall, cpu = time.perf_counter(), time.process_time()
        compiled_probabilities(scores.clone(), count_bias, kv_is_pad, start, 15.0, False, None, torch.bfloat16)
        print(f"{call} call: wall {time.perf_counter() - wall:.2f} s, CPU {time.process_time() - cpu:.2f} s")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"child processes' CPU: {children.ru_utime + children.ru_stime:.2f} s")


if __name__ == "__main__":
    main()
