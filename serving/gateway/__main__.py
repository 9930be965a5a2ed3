"""`python -m serving.gateway`: run the gateway until SIGTERM/SIGINT (see `--help`)."""
import sys

from .app import main

sys.exit(main())
