import os
import sys
from pathlib import Path

# Every kernel output starts as NaN under test, so unwritten elements fail the checks.
os.environ["DMA_DEBUG_POISON"] = "1"
sys.path.insert(0, str(Path(__file__).parent))
