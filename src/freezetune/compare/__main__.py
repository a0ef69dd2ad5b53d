"""``python -m freezetune.compare FD``: the worker process of one comparison arm.

See :class:`freezetune.compare.worker.ProcessArm`. The entry point lives here rather than in
``worker.py``: ``python -m freezetune.compare.worker`` would execute a second copy of a module that
the package ``__init__`` has already imported (runpy warns about exactly that, once per worker).
"""

import sys
from multiprocessing.connection import Connection

from freezetune.compare.worker import worker_main

worker_main(Connection(int(sys.argv[1])))
