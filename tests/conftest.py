"""Test-session settings shared by every test module."""

import os

# sample.main() and friends turn on sdjax's compilation cache; in-process tests must neither write the user's
# ~/.cache/sdjax nor change how later tests compile. tests/test_compile_cache.py runs its own processes with it on.
os.environ["SDJAX_NO_COMPILE_CACHE"] = "1"
