"""``python -m dicom_node`` is the same as the ``cxr-node`` console script."""

import sys

from dicom_node.cli import main

sys.exit(main())
