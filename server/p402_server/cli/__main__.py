"""`python -m p402_server.cli` runs the `p402` command line."""
import sys

from p402_server.cli.main import main

sys.exit(main())
