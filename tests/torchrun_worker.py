"""One torchrun worker that runs several ``condiff`` commands in turn, as ``-m condiff`` would.

The tests launch it once instead of once per command, to pay torch's start-up
once: ``torchrun ... tests/torchrun_worker.py '[[ARGV], [ARGV], ...]' PORT``.
The first command opens and closes its own process group, exactly as under
``torchrun -m condiff``.  The others then run inside one gloo group opened here
on a fresh store at 127.0.0.1:PORT (torchrun's store still holds the first
group's keys, so that group cannot be opened twice); a command finding a group
open uses it.
"""

import json
import os
import sys

import torch.distributed as td

from condiff import cli

if __name__ == "__main__":
    commands, port = json.loads(sys.argv[1]), int(sys.argv[2])
    if cli.main(commands[0]):
        sys.exit(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = td.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    td.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        for argv in commands[1:]:
            if cli.main(argv):
                sys.exit(1)
    finally:
        td.destroy_process_group()
