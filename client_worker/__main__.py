import sys

from client_worker.cli import main

sys.exit(main())
