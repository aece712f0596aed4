import sys

from awq_ref.cli import main

sys.exit(main())
