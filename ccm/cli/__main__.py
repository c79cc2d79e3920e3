"""``python -m ccm.cli`` = the ``ccm`` command."""

import sys

from ccm.cli.main import main

sys.exit(main())
