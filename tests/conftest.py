import os
import sys
from pathlib import Path

# the tests import the packages from the checkout whether or not it is pip-installed
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
