"""``python -m freezetune.compare --forkserver FD``: the process that forks the comparison's memory workers.

See :mod:`freezetune.compare.forkserver`: it imports the worker's modules once (here), then forks
one worker per arm, each serving :func:`~freezetune.compare.worker.worker_main` on its socket.
``--worker FD`` serves one arm in this interpreter instead (where forking is not used). The
entry point lives here rather than in ``forkserver.py``: ``python -m freezetune.compare.forkserver``
would execute a second copy of a module that the package ``__init__`` has already imported (runpy
warns about exactly that).
"""

import os
import sys
from multiprocessing.connection import Connection

from freezetune.compare.forkserver import serve
from freezetune.compare.worker import worker_main

if sys.argv[1:2] not in (["--forkserver"], ["--worker"]) or len(sys.argv) != 3:
    sys.exit("usage: python -m freezetune.compare --forkserver|--worker FD (started by freezetune compare)")
conn = Connection(int(sys.argv[2]))
if sys.argv[1] == "--worker":  # one worker in a fresh interpreter, where forking is not used
    worker_main(conn)
else:
    serve(conn, worker_main)
# Nothing is left to write or release: skip tearing down torch's modules (seconds on a small VM).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
