"""What a fresh process pays before bf16 attention runs on the CPU: loading (or building) the compiled score loop.

Under ``--precision bf16-mixed`` on the CPU the attention's score work is one compiled loop
(``model.attention.CachedScoreLoop``), kept as an AOTInductor package in the user's cache folder
(``$TRANSCRIPTFORMER_CACHE``, else ``~/.cache/transcriptformer``). This script, in this fresh process, times finding
and loading the package, then the first and the second call on small bf16 scores, and prints wall and CPU time, the
CPU time of child processes (the C++ compiler) and the import of torch. ``--build`` compiles the package on the first
call when the cache folder lacks it (what a long enough run does); without it a missing package means eager calls::

    python benchmarks/bf16_first_call.py --build                                          # as a user has it
    TRANSCRIPTFORMER_CACHE=$(mktemp -d) python benchmarks/bf16_first_call.py --build      # built afresh
"""

from __future__ import annotations

import argparse
import os
import resource
import time

started_wall, started_cpu = time.perf_counter(), time.process_time()
import torch  # noqa: E402

from transcriptformer.model.attention import BUILD_SCORE_LOOP_AFTER, CachedScoreLoop  # noqa: E402

imported_wall, imported_cpu = time.perf_counter(), time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="build a missing package on the first call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch, heads, keys, rows = 2, 8, 300, 200
    scores = torch.randn(batch, heads, rows, keys, dtype=torch.bfloat16)
    count_bias, kv_is_pad = torch.randn(batch, keys), torch.zeros(batch, keys, dtype=torch.bool)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"import torch: wall {imported_wall - started_wall:.2f} s, CPU {imported_cpu - started_cpu:.2f} s")
    wall, cpu = time.perf_counter(), time.process_time()
    loop = CachedScoreLoop(
        15.0, False, torch.bfloat16, torch.bfloat16, build_after=0 if args.build else BUILD_SCORE_LOOP_AFTER
    )
    found = "loaded" if loop.loop is not None else "none in the cache folder"
    print(
        f"package {loop.path}: {found}, wall {time.perf_counter() - wall:.3f} s, CPU {time.process_time() - cpu:.3f} s"
    )
    for call in ("first", "second"):
        wall, cpu = time.perf_counter(), time.process_time()
        loop(scores.clone(), count_bias, kv_is_pad, None)
        how = "compiled" if loop.loop is not None else "eager"
        print(f"{call} call ({how}): wall {time.perf_counter() - wall:.3f} s, CPU {time.process_time() - cpu:.3f} s")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"child processes' CPU: {children.ru_utime + children.ru_stime:.2f} s")


if __name__ == "__main__":
    main()
