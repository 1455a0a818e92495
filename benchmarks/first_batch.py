"""What a fresh ``transcriptformer inference`` process spends before its first batch, phase by phase.

Run it as a fresh process (it times its own imports): the imports of the command's run, then
:func:`~transcriptformer.engine.session.prepare` (the checkpoint loaded and checked, the input opened, read and
tokenized) and the run's description (which waits for the weights file's SHA-256), with the settings that the
command line gives ``inference``. Prints wall and CPU seconds (of every thread of this process) of each phase.
``bench_inference.build_checkpoint`` (or ``vs_original.py``) makes a checkpoint for real cells::

    OMP_NUM_THREADS=1 python benchmarks/first_batch.py --checkpoint CKPT --data cells.h5ad
"""

import time

STARTED, STARTED_CPU = time.perf_counter(), time.process_time()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from transcriptformer.cli import build_parser  # noqa: E402
from transcriptformer.cli.inference import config_from_args  # noqa: E402
from transcriptformer.engine import parts  # noqa: E402
from transcriptformer.engine.run import prepare  # noqa: E402  (the imports of the command's run)
from transcriptformer.tasks.embed import EmbedTask  # noqa: E402


def main() -> None:
    marks = [("imports", time.perf_counter(), time.process_time())]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="an .h5ad of real cells, gene ids in var['ensembl_id']")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        flags = ["--checkpoint-path", args.checkpoint, "--data-file", args.data, "--gene-col-name", "ensembl_id"]
        flags += ["--remove-duplicate-genes", "--precision", "32", "--device", "cpu", "--output-path", out]
        config = config_from_args(build_parser().parse_args(["inference", *flags]))
        with prepare(config, torch.device("cpu"), EmbedTask()) as session:
            marks.append(("checkpoint and input", time.perf_counter(), time.process_time()))
            parts.open_parts_dir(session)
            marks.append(("run description (weights hash)", time.perf_counter(), time.process_time()))
    previous = (STARTED, STARTED_CPU)
    for name, wall, cpu in marks:
        print(f"{name:<32} wall {wall - previous[0]:5.2f} s  CPU {cpu - previous[1]:5.2f} s")
        previous = (wall, cpu)
    total_wall, total_cpu = marks[-1][1] - STARTED, marks[-1][2] - STARTED_CPU
    print(
        f"{'before the first batch':<32} wall {total_wall:5.2f} s  CPU {total_cpu:5.2f} s  "
        f"(load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} torch threads)"
    )


if __name__ == "__main__":
    main()
