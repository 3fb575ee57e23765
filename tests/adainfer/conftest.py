import os
import sys

# Lets tests import the helpers of this folder by name (e.g. tiny_models). Tests run with
# --import-mode=importlib, so that this folder never shadows the `adainfer` package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
