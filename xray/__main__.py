import os
import sys

from xray.cli import main

try:
    code = main()
    sys.stdout.flush()  # a closed pipe (``... | head``) shows here, inside the try
except BrokenPipeError:
    # The reader went away (``python -m xray versions | head -3``): stop quietly, as the Python docs advise
    # for SIGPIPE; point stdout at devnull so the interpreter's own flush at exit cannot raise again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 1
sys.exit(code)
