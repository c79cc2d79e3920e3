"""``python -m ccm.cli`` = the ``ccm`` command, as tools start it (the napari Train widget, benchmarks).

A process started from one whose SIGINT is ignored (a pytest-xdist worker, a background job of a
non-interactive shell) inherits the ignore, and Python then never raises KeyboardInterrupt: Stop
(SIGINT) would be lost and the run would not end resumably. Ctrl-C semantics are restored here.
"""

import signal
import sys

from ccm.cli.main import main

signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main())
