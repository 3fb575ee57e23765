import os
import sys

# Lets tests import small helper kernel modules of this folder by name (e.g. aot_toy).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
