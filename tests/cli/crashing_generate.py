"""Test helper: run ``deis_fast.cli.generate`` and die abruptly (``os._exit``) in the middle of writing a batch,
like a killed process. Usage (also under torchrun):

    python tests/cli/crashing_generate.py --fail-after K [--fail-rank R] -- GENERATE-ARGS...

Rank R (default: 1 under torchrun, else 0), once it has made K samples, starts its next batch: it writes the
pending journal and the batch's data files, leaves a partial temporary file, and exits before the record."""
import os
import sys

from deis_fast.cli import generate as gen


def main() -> None:
    argv = sys.argv[1:]
    sep = argv.index("--")
    own, rest = argv[:sep], argv[sep + 1:]
    fail_after = int(own[own.index("--fail-after") + 1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fail_rank = int(own[own.index("--fail-rank") + 1]) if "--fail-rank" in own else (1 if world > 1 else 0)
    rank = int(os.environ.get("RANK", "0"))
    made = [0]
    original_atomic_write = gen._atomic_write

    def crashing_atomic_write(path, write, mode="wb"):
        name = os.path.basename(path)
        if name.startswith("shard-") and rank == fail_rank and made[0] >= fail_after:
            with open(os.path.join(os.path.dirname(os.path.dirname(path)), f".tmp-partial.png.{os.getpid()}.0badc0de"),
                      "wb") as f:
                f.write(b"\x89PNG partial")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)  # the journal and the data files exist, the record does not
        original_atomic_write(path, write, mode)
        if name.startswith("shard-"):
            import json
            with open(path) as f:
                made[0] += len(json.load(f)["indices"])

    gen._atomic_write = crashing_atomic_write
    sys.exit(gen.main(rest))


if __name__ == "__main__":
    main()
