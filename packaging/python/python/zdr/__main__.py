"""The `zdr` console script: the whole program, in this interpreter."""

import os
import sys


def main():
    # The executable the master re-executes and starts its workers from:
    # this script (whose first line names this virtualenv's interpreter),
    # not the base interpreter that /proc/self/exe names.
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) != "zdr" or not os.path.isfile(script):
        # `python -m zdr`: the console script beside this interpreter.
        script = os.path.join(os.path.dirname(sys.executable), "zdr")
    if os.path.isfile(script) and not os.environ.get("ZDR_EXECUTABLE"):
        os.environ["ZDR_EXECUTABLE"] = script
    from zdr._zdr import main as run

    run(["zdr", *sys.argv[1:]])


if __name__ == "__main__":
    main()
